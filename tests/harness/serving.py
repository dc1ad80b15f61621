"""Requests for the served model, built as a client of the Open Inference Protocol would."""

from __future__ import annotations

from typing import Any


def v2(seeds: Any, datatype: str = "INT64", shape: list[int] | None = None, **params: Any) -> dict:
    """A V2 inference body with one ``seed`` input; ``params`` become request parameters."""
    body = {
        "inputs": [
            {"name": "seed", "shape": shape or [len(seeds)], "datatype": datatype, "data": seeds}
        ]
    }
    if params:
        body["parameters"] = params
    return body
