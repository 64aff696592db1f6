"""Defaults that work on small data: every setting left automatic, MiniLM learns a small
balanced set (80 short sentences written here, not the shipped sample), and explicit settings
always win over the automatic choice."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest

from engine.finetune import JobSpec, JobStore, TrainConfig
from engine.finetune.config import SMALL_LR, choose_settings, plan

POSITIVE = [
    "I loved every minute of this film.",
    "The food was delicious and the staff were friendly.",
    "What a wonderful surprise, thank you so much!",
    "This phone works perfectly and the battery lasts all day.",
    "Best concert I have been to in years.",
    "The hotel room was clean, bright and quiet.",
    "She was delighted with her new bike.",
    "Great service, fast delivery, very happy.",
    "The book was a joy to read from start to finish.",
    "Our holiday was relaxing and beautiful.",
    "I am thrilled with the results.",
    "The new update made the app much faster, well done.",
    "A charming little cafe with excellent coffee.",
    "The kids had a fantastic time at the park.",
    "This is exactly what I hoped for.",
    "The teacher was patient, kind and inspiring.",
    "Superb acting and a moving story.",
    "I would happily recommend this shop to anyone.",
    "The garden looks lovely in the spring sunshine.",
    "Such a pleasant and helpful team.",
    "The soup was warm, tasty and comforting.",
    "We enjoyed a perfect evening together.",
    "Brilliant design, it feels great in the hand.",
    "My new shoes are comfortable and stylish.",
    "The museum tour was fascinating and fun.",
    "Everything arrived early and in perfect condition.",
    "He gave an excellent, uplifting speech.",
    "I am so glad we chose this place.",
    "The music was beautiful and made me smile.",
    "A lovely, heartwarming film for the whole family.",
    "The repair was quick and the price was fair.",
    "This recipe turned out amazing.",
    "What a great game, we played brilliantly.",
    "The view from the top was breathtaking.",
    "I feel happy and grateful today.",
    "The course was clear, useful and enjoyable.",
    "Our neighbours are warm and generous people.",
    "The laptop is fast, light and reliable.",
    "A delightful read with wonderful characters.",
    "The staff went out of their way to help us.",
]

NEGATIVE = [
    "I hated every minute of this film.",
    "The food was cold and the staff were rude.",
    "What a terrible mess, I am so disappointed.",
    "This phone keeps crashing and the battery dies by noon.",
    "Worst concert I have ever been to.",
    "The hotel room was dirty, dark and noisy.",
    "She was upset that her new bike broke.",
    "Awful service, late delivery, very annoyed.",
    "The book was boring and hard to finish.",
    "Our holiday was stressful and miserable.",
    "I am furious about the results.",
    "The new update made the app slow and buggy.",
    "A gloomy cafe with bitter, burnt coffee.",
    "The kids were bored and cried all afternoon.",
    "This is nothing like what I was promised.",
    "The teacher was impatient, rude and dull.",
    "Wooden acting and a pointless story.",
    "I would never recommend this shop to anyone.",
    "The garden is full of weeds and rubbish.",
    "Such an unpleasant and unhelpful team.",
    "The soup was bland, salty and greasy.",
    "We had a horrible evening and left early.",
    "Cheap design, it feels flimsy and broke at once.",
    "My new shoes hurt and fell apart in a week.",
    "The museum tour was tedious and overpriced.",
    "The parcel arrived late and badly damaged.",
    "He gave a dull, depressing speech.",
    "I regret coming to this place.",
    "The music was harsh and gave me a headache.",
    "A dreadful, depressing film, avoid it.",
    "The repair took weeks and cost far too much.",
    "This recipe was a complete failure.",
    "What a dreadful game, we played terribly.",
    "The view was blocked by ugly buildings.",
    "I feel sad and lonely today.",
    "The course was confusing, useless and frustrating.",
    "Our neighbours are loud and hostile.",
    "The laptop is slow, heavy and unreliable.",
    "A tiresome read with flat, annoying characters.",
    "The staff ignored us and refused to help.",
]


def write_set(path: Path) -> Path:
    """The 80 sentences as a CSV (40 per class)."""
    rows = [(t, "positive") for t in POSITIVE] + [(t, "negative") for t in NEGATIVE]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def test_the_set_is_balanced_and_distinct():
    assert len(POSITIVE) == len(NEGATIVE) == 40
    assert len(set(POSITIVE) | set(NEGATIVE)) == 80


@pytest.mark.slow
def test_all_defaults_learn_a_small_set(tmp_path):
    """64 training / 16 held-out sentences, nothing set: >= 0.85 held-out accuracy. The old
    defaults (3 epochs, batch 16, 5e-5: 12 steps) gave 0.81 on this very set."""
    data = write_set(tmp_path / "reviews.csv")
    jobs = JobStore(tmp_path / "home")
    start = time.monotonic()
    job = jobs.submit(
        JobSpec(base="minilm-l6", task="classification", data=str(data), out="small-set")
    )
    info = jobs.wait(job.id, timeout_s=300)
    seconds = time.monotonic() - start
    assert info.status == "completed", (info.error, jobs.log_tail(job.id, 40))
    result = jobs.result(job.id)
    cfg = result.hyperparameters
    # what was chosen: batch 8, enough epochs for 40 steps, the small-set rate
    assert (cfg.batch_size, cfg.epochs, cfg.learning_rate) == (8, 5.0, SMALL_LR)
    assert result.steps == 40 == plan(64, 8, 5.0, 0)[0]
    assert sum(map(sum, result.metrics_after["confusion"])) == 16  # held-out examples
    accuracy = result.metrics_after["accuracy"]
    print(f"small set, all defaults: accuracy {accuracy:.3f}, {seconds:.1f} s, 40 steps")
    assert accuracy >= 0.85
    state = json.loads((info.folder / "state.json").read_text())
    assert state["settings"]["why"].startswith(
        "64 training examples, batch 8: 40 steps (5 epochs) at 2e-4."
    )
    assert state["settings"]["automatic"] == ["epochs", "batch_size", "learning_rate"]
    # under 60 s on 2 cores; a machine loaded by other work (full suite) only reports it
    assert seconds < 60 or os.getloadavg()[0] > 1.5 * (os.cpu_count() or 1), seconds


def test_explicit_settings_win(tmp_path):
    """Values the user sets are kept, alone or mixed with automatic ones; the spec keeps
    automatic values as None (so a resumed job chooses the same) and its data decides them."""
    mine = TrainConfig(epochs=2.0, batch_size=4, learning_rate=1e-3)
    got = choose_settings(mine, 64, "classification")
    assert (got.train.epochs, got.train.batch_size, got.train.learning_rate) == (2.0, 4, 1e-3)
    assert got.steps == 32 and got.automatic == ()
    assert got.why == (
        "64 training examples, batch 4: 32 steps (2 epochs) at 1e-3. "
        "Set by you: epochs, batch size, learning rate."
    )
    lr_only = choose_settings(TrainConfig(learning_rate=3e-5), 64, "classification")
    assert lr_only.train.learning_rate == 3e-5 and lr_only.train.batch_size == 8
    assert lr_only.automatic == ("epochs", "batch_size") and "Set by you: learning rate" in (
        lr_only.why
    )
    steps = choose_settings(TrainConfig(max_steps=7), 64, "classification")
    assert steps.steps == 7 and "max_steps 7" in steps.why
    # large sets, causal LM and LoRA keep the usual defaults
    large = choose_settings(TrainConfig(), 5000, "classification").train
    assert (large.epochs, large.batch_size, large.learning_rate) == (3.0, 16, 5e-5)
    assert choose_settings(TrainConfig(), 64, "causal-lm").train.learning_rate == 5e-5
    assert choose_settings(TrainConfig(lora=True), 64, "classification").train.learning_rate == 5e-4
    # few examples: more epochs, capped; several processes share the batch of 8
    assert choose_settings(TrainConfig(), 8, "classification").train.epochs == 20.0
    two = choose_settings(TrainConfig(), 64, "classification", world=2)
    assert two.train.batch_size == 4 and two.steps == 40

    data = write_set(tmp_path / "reviews.csv")
    spec = JobSpec(base="minilm-l6", task="classification", data=str(data), out="x")
    assert spec.validated().train.learning_rate is None
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert spec.settings().n_train == 64 and spec.settings().steps == 40
    explicit = JobSpec(base="minilm-l6", task="classification", data=str(data), out="x", train=mine)
    assert explicit.settings().train == mine


def test_explicit_settings_reach_the_job(tmp_path, tiny_models):
    """The job process trains with the user's values, not the automatic ones."""
    data = write_set(tmp_path / "reviews.csv")
    jobs = JobStore(tmp_path / "home")
    train = TrainConfig(epochs=1.0, batch_size=32, learning_rate=1e-3, max_length=16)
    spec = JobSpec(
        base=str(tiny_models["classifier"]), task="classification", data=str(data), out="t",
        train=train,
    )  # fmt: skip
    info = jobs.wait(jobs.submit(spec).id, timeout_s=120)
    assert info.status == "completed", info.error
    result = jobs.result(info.id)
    assert result.steps == 2  # 64 examples / batch 32, one epoch (automatic would be 40)
    assert result.hyperparameters == train
