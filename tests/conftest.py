import pytest

LONG_TESTS = {"test_distilled_student_beats_sft_only_at_equal_steps"}
"""Over 10 minutes on 2 cores (several full SFT runs): run with POSTTRAIN_LONG_TESTS=1."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run only where CUDA is present; CI and laptops skip them. LONG_TESTS run on request."""
    import os

    if os.environ.get("POSTTRAIN_LONG_TESTS") != "1":
        for item in items:
            if item.name in LONG_TESTS:
                item.add_marker(pytest.mark.skip(reason="long: set POSTTRAIN_LONG_TESTS=1"))
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory: pytest.TempPathFactory):
    """Folder of a tiny random Qwen3 with the local tokenizer, built once per session."""
    from posttrain.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "text", "text")


@pytest.fixture(scope="session")
def tiny_vl_model(tmp_path_factory: pytest.TempPathFactory):
    """Folder of a tiny random Qwen3-VL with its processor, built once per session."""
    from posttrain.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "vl", "vl")
