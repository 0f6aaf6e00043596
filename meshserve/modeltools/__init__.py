"""Model lifecycle tooling behind `meshserve model ...`: convert, optimize, quantize, validate, publish, package.

One module per step. Each step is a plain function that returns a report
dataclass and raises `ModelToolError` with a message that says what to do;
the CLI in `meshserve.commands.model` renders reports and maps errors to exit
codes.
"""
