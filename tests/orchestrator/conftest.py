"""Job-test fixtures: the tiny model saved as a real checkpoint."""

import pytest


@pytest.fixture
def model_dir(tmp_path, tiny_model, tiny_tokenizer):
    d = tmp_path / "tiny"
    tiny_model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d
