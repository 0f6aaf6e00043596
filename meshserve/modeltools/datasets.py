"""Sample, calibration and validation data: `.npy` / `.npz` files or the built-in digits demo dataset.

`.npz` files hold the inputs under `x`/`X`/`inputs` (or the model's input
name, or their only array) and, optionally, labels under `y`/`labels`.
The built-in `digits` dataset is scikit-learn's bundled 8x8 handwritten
digits (offline), as float32 pixel intensities 0..16 flattened to 64
features, the same inputs the `digits` demo model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meshserve.modeltools.errors import ModelToolError

BUILTIN_DATASETS = ("digits",)
_INPUT_KEYS = ("x", "X", "inputs", "input", "data")
_LABEL_KEYS = ("y", "Y", "labels", "label", "targets")


@dataclass(frozen=True)
class Dataset:
    inputs: np.ndarray
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(self.inputs)


def digits() -> Dataset:
    """scikit-learn's bundled digits (1797 samples, 64 float32 features, labels 0..9)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return Dataset(bunch.data.astype(np.float32), bunch.target.astype(np.int64), "digits")


def load(spec: str, input_name: str | None = None) -> Dataset:
    """Loads `spec`: a built-in dataset name, a `.npy` file (inputs only) or a `.npz` file."""
    if spec in BUILTIN_DATASETS:
        return digits()
    path = Path(spec)
    if not path.is_file():
        raise ModelToolError(
            f"data {spec!r} not found: give a .npy or .npz file, or one of the built-in datasets: "
            + ", ".join(BUILTIN_DATASETS)
        )
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelToolError(f"cannot read {path} as NumPy data ({exc}); save it with numpy.save/savez") from exc
    if isinstance(loaded, np.ndarray):
        return Dataset(loaded, None, str(path))
    with loaded:
        arrays = {key: loaded[key] for key in loaded.files}
    return _from_arrays(arrays, str(path), input_name)


def _from_arrays(arrays: dict[str, np.ndarray], source: str, input_name: str | None) -> Dataset:
    labels_key = next((key for key in _LABEL_KEYS if key in arrays), None)
    candidates = [key for key in (input_name, *_INPUT_KEYS) if key and key in arrays]
    if not candidates:
        others = [key for key in arrays if key != labels_key]
        if len(others) != 1:
            raise ModelToolError(
                f"{source} holds {sorted(arrays)}: name the inputs 'x' (and the labels 'y') when saving it"
            )
        candidates = others
    inputs = arrays[candidates[0]]
    labels = arrays[labels_key] if labels_key else None
    if labels is not None and len(labels) != len(inputs):
        raise ModelToolError(f"{source}: {len(inputs)} inputs but {len(labels)} labels; they must match")
    return Dataset(inputs, labels, source)
