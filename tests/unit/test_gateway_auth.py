"""Authentication and authorization decisions: API keys, JWTs, tenants' model globs, file reload."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.auth import Authenticator, AuthError, AuthFileWatcher, hash_key, parse_auth_file, single_key_config

SECRET = "s3cret-for-hs256-tests-0123456789abcdef"


def _rsa_pair() -> tuple[bytes, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public.decode()


@pytest.fixture(scope="module")
def rsa_pair() -> tuple[bytes, str]:
    return _rsa_pair()


def _write(path: Path, public_key: str, keys: dict[str, list[str]]) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "tenants": {
                    "acme": {
                        "models": ["digits*"],
                        "rate_limit": 5,
                        "keys": [{"sha256": hash_key(k)} for k in keys["acme"]],
                    },
                    "globex": {"models": "*", "keys": [hash_key(k) for k in keys["globex"]]},
                },
                "jwt": {"audience": "meshserve", "hs256_secret": SECRET, "rs256_public_key": public_key},
            }
        )
    )


@pytest.fixture
def auth(tmp_path: Path, rsa_pair: tuple[bytes, str]) -> Authenticator:
    path = tmp_path / "auth.yaml"
    _write(path, rsa_pair[1], {"acme": ["key-acme"], "globex": ["key-globex"]})
    return Authenticator(parse_auth_file(path))


def bearer(token: str) -> list[tuple[str, str]]:
    return [("user-agent", "x"), ("authorization", f"Bearer {token}")]


def code_of(auth: Authenticator, metadata: list[tuple[str, str]] | None) -> grpc.StatusCode:
    with pytest.raises(AuthError) as info:
        auth.authenticate(metadata)
    return info.value.code


def test_api_keys_map_to_their_tenant(auth: Authenticator) -> None:
    assert auth.authenticate(bearer("key-acme")).name == "acme"
    assert auth.authenticate(bearer("key-globex")).name == "globex"
    assert auth.authenticate(bearer("key-acme")).rate_limit == 5.0


@pytest.mark.parametrize(
    "metadata",
    [None, [], [("authorization", "key-acme")], [("authorization", "Basic a2V5")], [("authorization", "Bearer ")]],
    ids=["none", "empty", "no-scheme", "basic", "empty-token"],
)
def test_missing_or_malformed_credentials_are_unauthenticated(auth: Authenticator, metadata: list | None) -> None:
    assert code_of(auth, metadata) == grpc.StatusCode.UNAUTHENTICATED


def test_unknown_key_is_unauthenticated(auth: Authenticator) -> None:
    assert code_of(auth, bearer("key-nobody")) == grpc.StatusCode.UNAUTHENTICATED


def test_hs256_and_rs256_jwts(auth: Authenticator, rsa_pair: tuple[bytes, str]) -> None:
    now = int(time.time())
    hs = jwt.encode({"tenant": "acme", "aud": "meshserve", "exp": now + 60}, SECRET, algorithm="HS256")
    rs = jwt.encode({"tenant": "globex", "aud": "meshserve", "exp": now + 60}, rsa_pair[0], algorithm="RS256")
    assert auth.authenticate(bearer(hs)).name == "acme"
    assert auth.authenticate(bearer(rs)).name == "globex"


@pytest.mark.parametrize(
    "claims, key",
    [
        ({"tenant": "acme", "aud": "meshserve", "exp": -10}, SECRET),
        ({"tenant": "acme", "aud": "other", "exp": 60}, SECRET),
        ({"tenant": "acme", "aud": "meshserve", "nbf": 600, "exp": 900}, SECRET),
        ({"tenant": "acme", "aud": "meshserve", "exp": 60}, "wrong-secret-wrong-secret-wrong-secret"),
        ({"tenant": "nobody", "aud": "meshserve", "exp": 60}, SECRET),
    ],
    ids=["expired", "wrong-audience", "not-yet-valid", "bad-signature", "unknown-tenant"],
)
def test_bad_jwts_are_unauthenticated(auth: Authenticator, claims: dict, key: str) -> None:
    now = int(time.time())
    claims = {k: now + v if k in ("exp", "nbf") else v for k, v in claims.items()}
    token = jwt.encode(claims, key, algorithm="HS256")
    assert code_of(auth, bearer(token)) == grpc.StatusCode.UNAUTHENTICATED


def test_cached_jwt_stops_working_when_it_expires(auth: Authenticator) -> None:
    token = jwt.encode({"tenant": "acme", "aud": "meshserve", "exp": int(time.time()) + 1}, SECRET, algorithm="HS256")
    assert auth.authenticate(bearer(token)).name == "acme"
    time.sleep(1.1)
    assert code_of(auth, bearer(token)) == grpc.StatusCode.UNAUTHENTICATED


def test_model_globs_per_tenant(auth: Authenticator) -> None:
    acme = auth.authenticate(bearer("key-acme"))
    auth.authorize(acme, "digits")
    auth.authorize(acme, "digits-q")
    with pytest.raises(AuthError) as info:
        auth.authorize(acme, "mlp784")
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert "acme" in info.value.message and "mlp784" in info.value.message
    auth.authorize(auth.authenticate(bearer("key-globex")), "mlp784")


def test_single_api_key_and_open_mode() -> None:
    auth = Authenticator(single_key_config("only-key"))
    assert auth.authenticate(bearer("only-key")).name == "default"
    assert code_of(auth, bearer("other")) == grpc.StatusCode.UNAUTHENTICATED
    assert Authenticator(None).authenticate(None) is Authenticator.OPEN


def test_invalid_auth_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "auth.yaml"
    path.write_text("tenants:\n  acme:\n    keys: [not-a-digest]\n")
    with pytest.raises(ValueError, match="SHA-256"):
        parse_auth_file(path)


async def test_key_rotation_in_the_file_applies_without_restart(tmp_path: Path, rsa_pair: tuple[bytes, str]) -> None:
    path = tmp_path / "auth.yaml"
    _write(path, rsa_pair[1], {"acme": ["old-key"], "globex": []})
    auth = Authenticator(None)
    watcher = AuthFileWatcher(path, auth, interval=0.05)
    watcher.load()
    watcher.start()
    try:
        assert auth.authenticate(bearer("old-key")).name == "acme"
        _write(path, rsa_pair[1], {"acme": ["new-key"], "globex": []})
        for _ in range(100):
            await asyncio.sleep(0.05)
            try:
                auth.authenticate(bearer("new-key"))
                break
            except AuthError:
                continue
        assert auth.authenticate(bearer("new-key")).name == "acme"
        assert code_of(auth, bearer("old-key")) == grpc.StatusCode.UNAUTHENTICATED
        # A broken file keeps the last good configuration.
        path.write_text("tenants: [oops")
        await asyncio.sleep(0.3)
        assert auth.authenticate(bearer("new-key")).name == "acme"
    finally:
        await watcher.close()


def test_api_key_beside_an_auth_file(tmp_path: Path, rsa_pair: tuple[bytes, str]) -> None:
    path = tmp_path / "auth.yaml"
    _write(path, rsa_pair[1], {"acme": ["key-acme"], "globex": []})
    auth = Authenticator(None)
    AuthFileWatcher(path, auth, extra=single_key_config("launcher-key")).load()
    assert auth.authenticate(bearer("launcher-key")).name == "default"
    assert auth.authenticate(bearer("key-acme")).name == "acme"


def test_only_tenants_marked_admin_may_change_the_mesh(tmp_path: Path) -> None:
    from gateway.keyfile import add_key

    path = tmp_path / "auth.yaml"
    user_key = add_key(path, "team", models=["digits*"])
    admin_key = add_key(path, "ops", admin=True)
    assert yaml.safe_load(path.read_text())["tenants"]["ops"]["admin"] is True
    auth = Authenticator(parse_auth_file(path))
    assert not auth.authenticate([("authorization", f"Bearer {user_key}")]).admin
    assert auth.authenticate([("authorization", f"Bearer {admin_key}")]).admin
    # The one --api-key is the operator's key; with no authentication nothing is guarded.
    assert Authenticator(single_key_config("k")).authenticate([("authorization", "Bearer k")]).admin
    assert Authenticator(None).authenticate(None).admin
