from __future__ import annotations

from pathlib import Path

import pytest

from bench.lib.tokenizer import build_tokenizer_dir
from services.epp_bridge.tokenizer import PoolTokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def pool_tokenizer(tokenizer_dir: Path) -> PoolTokenizer:
    return PoolTokenizer.load(tokenizer_dir)
