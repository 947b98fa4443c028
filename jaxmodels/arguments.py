"""Command-line argument types (argparse ``type=``) of the ``jaxmodels`` command and the benchmark
scripts, so that a script reads its options as the CLI does without importing the CLI. Each
raises ``argparse.ArgumentTypeError`` naming what it expected, which argparse prints as one line."""

from __future__ import annotations

import argparse
import math


def _bounded(text: str, convert, *, strict: bool, what: str):
    """``convert(text)``, finite and above 0 (``strict``) or at least 0."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (value > 0 if strict else value >= 0) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _bounded(text, int, strict=True, what="a positive integer")


def non_negative_int(text: str) -> int:
    return _bounded(text, int, strict=False, what="an integer >= 0")


def positive_float(text: str) -> float:
    return _bounded(text, float, strict=True, what="a positive number")


def non_negative_float(text: str) -> float:
    return _bounded(text, float, strict=False, what="a number >= 0")


def host_port(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. hidden_size=128), got {text!r}")
    return key.strip(), value
