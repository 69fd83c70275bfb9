import pytest


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
