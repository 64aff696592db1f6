"""What the benchmarks share: an offline environment, the repo on sys.path, the test store
(where the embedded models are already converted) and English filler text."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HOME = REPO / ".cache" / "test-home"

SENTENCES = (
    "The committee met on a grey Tuesday to discuss the bridge over the river.",
    "Nobody expected the old engineer to bring drawings from nineteen fifty-two.",
    "She argued that the cables had been replaced twice, but the records disagreed.",
    "After lunch, the mayor asked whether the town could afford another survey.",
    "Children crossed the bridge every morning on their way to the village school.",
    "In the end they voted to repair the deck and to paint the railings green.",
)
