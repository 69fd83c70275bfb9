"""Misbehaving rewards for the runtime tests. Each misbehaves only on completions holding its trigger word
and otherwise scores 0.5, so one batch can mix healthy and failing samples."""

import ctypes
import math
import os


def _triggered(completions, word):
    return any(word in c for c in completions)


def hang(completions, **kwargs):
    while _triggered(completions, "HANG"):  # spins forever holding the GIL
        pass
    return [0.5] * len(completions)


def boom(completions, **kwargs):
    if _triggered(completions, "BOOM"):
        raise ZeroDivisionError("boom")
    return [0.5] * len(completions)


def abort(completions, **kwargs):
    if _triggered(completions, "ABORT"):
        os.abort()  # SIGABRT, as when a C extension fails an assertion
    return [0.5] * len(completions)


def segfault(completions, **kwargs):
    if _triggered(completions, "SEGV"):
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return [0.5] * len(completions)


def hard_exit(completions, **kwargs):
    if _triggered(completions, "EXIT"):
        os._exit(3)
    return [0.5] * len(completions)


def nan(completions, **kwargs):
    return [math.nan if "NAN" in c else 0.5 for c in completions]


def wrong_length(completions, **kwargs):
    return [0.5] * (len(completions) + _triggered(completions, "LENGTH"))


def wrong_type(completions, **kwargs):
    return 0.5 if _triggered(completions, "TYPE") else [0.5] * len(completions)


def text_items(completions, **kwargs):
    return ["high" if "TEXT" in c else 0.5 for c in completions]


def always_fails(completions, **kwargs):
    raise RuntimeError("this plugin is broken")
