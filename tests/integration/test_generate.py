"""Personalised generation from a store built by the real nightly flow (tiny preset, smaller still):
different users batch in one forward pass, greedy batched == one request at a time, unknown users fall back to
the population prior with a notice, and `latentpref generate` prints the text.

One night per pytest session serves this module and test_report.py (`tiny_night`).
"""
import json
import os

import pyarrow.compute as pc
import pytest
import torch

from latentpref.pipelines import cli
from latentpref.pipelines.config import load_config
from latentpref.pipelines.nightly import NightlyReport, nightly
from latentpref.tasks.data.store import Store
from latentpref.tasks.evaluate.serving import PersonalizedGenerator

pytestmark = pytest.mark.slow

SMALLER = ["runtime.ray_num_cpus=2", "runtime.mlflow_experiment=it-serving", "data.n_prompts=80",
           "data.sft_steps=0", "data.n_candidates=4", "data.n_users=12", "pretrain.stage1_steps=6",
           "pretrain.stage2_steps=4", "pretrain.checkpoint_every=5", "personalize.steps=30",
           "evaluate.n_users=3", "evaluate.prompts_per_user=4", "evaluate.max_new_tokens=12",
           "evaluate.baseline_steps=4", "evaluate.baselines=[lora_dpo]"]


def tiny_night(session_dir: str):
    """(cfg, NightlyReport, store path) of one finished tiny night in the session folder: run on first use,
    then reused from its nightly_report.json (test_report.py imports this; a re-run would redo evaluate)."""
    store = os.path.join(session_dir, "tiny-serving-store")
    cfg = load_config("tiny", overrides=[f"runtime.store={store}", *SMALLER])
    runs = os.path.join(store, "runs")
    for run_id in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        path = os.path.join(runs, run_id, "nightly_report.json")
        if os.path.exists(path):
            with open(path) as fh:
                done = NightlyReport(**json.load(fh))
            if "report" in done.stages_run:
                return cfg, done, store
    return cfg, nightly(cfg, until="report"), store


@pytest.fixture(scope="module")
def night(session_dir):
    cfg, report, store = tiny_night(session_dir)
    return cfg, report, Store(store)


@pytest.fixture(scope="module")
def generator(night):
    return PersonalizedGenerator.from_store(night[2])


@pytest.fixture(scope="module")
def requests_(night):
    """A mix of fitted users (several per prompt) and one unknown user, over test prompts."""
    _, report, store = night
    records = store.read_table("runs", report.run_id, "personalize_users.parquet")
    fitted = [u for u, c in zip(records["user_id"].to_pylist(), records["cold_start"].to_pylist()) if not c]
    assert len(fitted) >= 4, "the tiny night should fit most users"
    prompts_dir = [d for d in store.listdir("data", "prompts")][0]
    prompts = store.read_table("data", "prompts", prompts_dir, "prompts.parquet")
    test = prompts.filter(pc.equal(prompts["split"], "test"))["prompt"].to_pylist()[:5]
    reqs = [(fitted[i % len(fitted)], test[i % len(test)]) for i in range(10)]
    reqs += [(fitted[0], test[1]), (fitted[1], test[1]), ("never-seen-user", test[2])]
    return reqs


def test_batched_greedy_equals_one_at_a_time(generator, requests_, monkeypatch):
    calls = []
    real = generator.clap.generate

    def spy(z, ids, mask, **kw):
        calls.append(z.clone())
        return real(z, ids, mask, **kw)

    monkeypatch.setattr(generator.clap, "generate", spy)
    batched = generator.generate(requests_, max_new_tokens=10)
    assert len(calls) == 1 and calls[0].shape[0] == len(requests_)   # one forward pass for every user
    z = calls[0]
    assert len({tuple(row.tolist()) for row in z}) > len(requests_) // 2   # rows really carry different prefixes
    monkeypatch.setattr(generator.clap, "generate", real)

    single = [generator.generate([r], max_new_tokens=10)[0] for r in requests_]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert [r.text for r in batched] == [r.text for r in single]
    assert [(r.user_id, r.prompt) for r in batched] == requests_          # results come back in request order
    assert all(r.personalized for r in batched[:-1])
    # two users on the same prompt get their own latents (so the batch mixes users, not copies of one)
    z_a, _ = generator.latents([requests_[-3][0]], [requests_[-3][1]])
    z_b, _ = generator.latents([requests_[-2][0]], [requests_[-2][1]])
    assert not torch.allclose(z_a, z_b)


def test_unknown_user_falls_back_to_the_prior_with_a_notice(generator, requests_):
    prompt = requests_[0][1]
    result = generator.generate([("never-seen-user", prompt)], max_new_tokens=8)[0]
    assert not result.personalized
    assert "never-seen-user" in result.notice and "population prior" in result.notice
    # the prior's mean is z = 0: same text as CLaP with a zero latent
    z, notices = generator.latents(["never-seen-user"], [prompt])
    assert torch.count_nonzero(z) == 0 and notices == [result.notice]
    with pytest.raises(ValueError, match="user_id"):
        generator.generate([("../etc/passwd", prompt)], max_new_tokens=2)


def test_cli_generate_prints_text(night, generator, requests_, capsys):
    _, _, store = night
    user, prompt = requests_[0]
    expected = generator.generate([(user, prompt)], max_new_tokens=6)[0].text
    rc = cli.main(["generate", "--user", user, "--prompt", prompt, "--max-new-tokens", "6", "--store", store.root])
    out = capsys.readouterr()
    assert rc == 0
    assert out.out == expected + "\n"
    assert "notice" not in out.err

    rc = cli.main(["generate", "--user", "never-seen-user", "--prompt", prompt, "--max-new-tokens", "4",
                   "--store", store.root])
    out = capsys.readouterr()
    assert rc == 0 and out.out.endswith("\n")
    assert "notice: user 'never-seen-user' has no fitted encoder: using the population prior" in out.err
