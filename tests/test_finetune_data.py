"""Fine-tuning's foundations: the padding mask and ``features`` of the model, loading pretrained
models (optarena runs, Hugging Face folders), JSONL examples, loss masks, the sampler, the
built-in task and its preference pairs, batched decoding."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from optarena.errors import UserError
from optarena.model import GPT, GPTConfig, apply_rotary
from optarena.posttrain import builtin
from optarena.posttrain.data import (
    IGNORE,
    Example,
    ExampleSampler,
    collate,
    read_jsonl,
    tokenize,
)
from optarena.posttrain.pretrained import default_chat_prompt, load_pretrained

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=64)
    return GPT(GPTConfig(**{**cfg, **kw})).double()


def reference_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The pre-training forward written out: plain causal attention, no mask anywhere."""
    T = idx.shape[1]
    cos, sin = model.rope_cos[:T].double(), model.rope_sin[:T].double()
    x = model.tok_emb(idx)
    for b in model.blocks:
        a = b.attn
        h = b.attn_norm(x)
        B = h.shape[0]
        q = a.q_norm(a.q_proj(h)).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)
        k = a.k_norm(a.k_proj(h)).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        rep = a.n_heads // a.n_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + a.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        x = x + b.mlp(b.mlp_norm(x))
    return model.lm_head(model.final_norm(x))


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids left-padded to the longest row, and the padding mask (True at real tokens)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = True
    return ids, mask


# --------------------------------------------------------------------------- model


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2, "norm": "rmsnorm", "mlp": "swiglu"}])
def test_forward_without_mask_is_the_plain_causal_forward_bit_for_bit(kw) -> None:
    model = tiny_gpt(**kw)
    idx = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        assert torch.equal(model(idx), reference_logits(model, idx))
        assert torch.equal(model.lm_head(model.features(idx)), model(idx))


def test_all_true_mask_matches_no_mask() -> None:
    model = tiny_gpt()
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(
            model(idx, torch.ones_like(idx, dtype=torch.bool)), model(idx), rtol=0, atol=1e-12
        )


def test_left_padded_rows_give_the_unpadded_outputs() -> None:
    model = tiny_gpt(n_kv_head=2)
    rows = [torch.randint(1, 97, (n,)) for n in (5, 11, 8)]
    ids, mask = left_pad([r.tolist() for r in rows], 0)
    with torch.no_grad():
        logits, feats = model(ids, mask), model.features(ids, mask)
        # the rotary table is float32: other absolute positions round their angles otherwise
        # (relative error ~1e-7); a padding key attended to would move them by ~1e-1
        for i, r in enumerate(rows):
            alone = model(r[None])[0]
            n = len(r)
            torch.testing.assert_close(logits[i, -n:], alone, rtol=0, atol=1e-7)
            torch.testing.assert_close(feats[i, -n:], model.features(r[None])[0], rtol=0, atol=1e-6)
            assert torch.isfinite(logits[i]).all()


# --------------------------------------------------------------------------- JSONL


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_jsonl_both_formats(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            json.dumps({"prompt": "2+2?", "response": "4", "id": 1}),
            "",
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"},
                    ]
                }
            ),
        ],
    )
    first, second = read_jsonl(path)
    assert first.messages == (("user", "2+2?"),) and first.response == "4" and first.line == 1
    assert second.messages == (("system", "Be brief."), ("user", "Hi"))
    assert second.response == "Hello" and second.line == 3


USER = {"role": "user", "content": "b"}
ASSISTANT = {"role": "assistant", "content": "b"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "x"}', r"d\.jsonl:2: no string response"),
        ('{"prompt": 3, "response": "y"}', r"d\.jsonl:2: no string prompt"),
        ("[1, 2]", r"d\.jsonl:2: expected"),
        ("{not json", r"d\.jsonl:2: not JSON"),
        ('{"messages": [{"role": "user", "content": "a"}]}', r"d\.jsonl:2: messages must"),
        (
            json.dumps({"messages": [{"role": "assistant", "content": "a"}, USER]}),
            r"d\.jsonl:2: the last message must be the assistant's",
        ),
        (
            json.dumps({"messages": [{"role": "bot", "content": "a"}, ASSISTANT]}),
            r"d\.jsonl:2: messages\[0\] role",
        ),
    ],
)
def test_bad_lines_are_one_line_errors_naming_the_line(tmp_path: Path, line, message) -> None:
    path = write_lines(tmp_path / "d.jsonl", ['{"prompt": "a", "response": "b"}', line])
    with pytest.raises(UserError, match=message) as info:
        read_jsonl(path)
    assert "\n" not in str(info.value)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="has no examples"):
        read_jsonl(write_lines(tmp_path / "e.jsonl", ["", "  "]))
    with pytest.raises(UserError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")


class CharTokenizer:
    """One id per character (ord), eos 0: enough to test the data path independently."""

    eos_id, pad_id = 0, 1

    def prompt_ids(self, messages) -> list[int]:
        return [ord(c) for c in default_chat_prompt(messages)]

    def response_ids(self, response: str) -> list[int]:
        return [*(ord(c) for c in response), self.eos_id]


def test_tokenize_targets_only_the_response_and_its_end() -> None:
    examples = [Example((("user", "ab"),), "xyz", line=1), Example((("user", "a"),), "q", line=2)]
    data = tokenize(examples, CharTokenizer(), 64, "d.jsonl")
    x, y = collate(data, [0, 1], pad_id=1)
    prompt = default_chat_prompt((("user", "ab"),))
    assert x.shape == y.shape == (2, len(prompt) + 3)
    assert y[0].tolist() == [IGNORE] * (len(prompt) - 1) + [ord("x"), ord("y"), ord("z"), 0]
    short = default_chat_prompt((("user", "a"),))
    assert x[1, len(short) + 1 :].eq(1).all()  # right padding
    assert (y[1] != IGNORE).sum() == 2 and y[1, len(short) - 1].item() == ord("q")


def test_right_padding_leaves_each_rows_loss_as_alone() -> None:
    model = tiny_gpt()

    class Tok(CharTokenizer):
        def prompt_ids(self, messages):
            return [3 + (ord(c) % 90) for c in messages[-1][1]]

        def response_ids(self, response):
            return [*(3 + (ord(c) % 90) for c in response), 0]

    examples = [Example((("user", p),), r) for p, r in [("abc", "de"), ("abcdefgh", "ijklm")]]
    data = tokenize(examples, Tok(), 32, "x")
    x, y = collate(data, [0, 1], pad_id=1)
    with torch.no_grad():
        both = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        for i in range(2):
            xi, yi = collate(data, [i], pad_id=1)
            alone = F.cross_entropy(model(xi)[0], yi[0], reduction="sum")
            torch.testing.assert_close(both[i].sum(), alone, rtol=0, atol=1e-12)


def test_prompt_longer_than_the_context_names_the_line() -> None:
    long = Example((("user", "x" * 80),), "y", line=7)
    with pytest.raises(UserError, match=r"d\.jsonl:7: the prompt is \d+ tokens.*context of 64"):
        tokenize([long], CharTokenizer(), 64, "d.jsonl")
    data = tokenize([Example((("user", "x"),), "y" * 100)], CharTokenizer(), 40, "d")
    assert data.truncated == 1 and len(data.ids[0]) == 41


def test_sampler_resumes_exactly_across_epochs() -> None:
    sampler = ExampleSampler(10, 4, seed=3)
    draws = [sampler.next_global() for _ in range(7)]
    assert sorted(draws[0] + draws[1] + draws[2][:2]) == list(range(10))  # an epoch, once each
    again = ExampleSampler(10, 4, seed=3)
    for _ in range(4):
        again.next_global()
    state = again.state_dict()
    resumed = ExampleSampler(10, 4, seed=99)
    resumed.load_state_dict(state)
    assert [resumed.next_global() for _ in range(3)] == draws[4:]
    sharded = [ExampleSampler(10, 4, seed=3, shard=(r, 2)) for r in range(2)]
    rows = [s.mine(s.next_global()) for s in sharded]
    assert rows[0] + rows[1] == draws[0]


# --------------------------------------------------------------------------- built-in task


def _solve(prompt: str) -> str:
    """The answer computed independently of the generator."""
    if m := re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str(a + b if op == "+" else a - b)
    if m := re.fullmatch(r"Which is larger, (\d+) or (\d+)\?", prompt):
        return str(max(int(m[1]), int(m[2])))
    if m := re.fullmatch(r"Reverse the word ([a-z]+)\.", prompt):
        return "".join(reversed(m[1]))
    if m := re.fullmatch(r"Sort the digits ([\d ]+)\.", prompt):
        return " ".join(sorted(m[1].split()))
    if m := re.fullmatch(r"How many letters are in ([a-z]+)\?", prompt):
        return str(len(m[1]))
    raise AssertionError(prompt)


def test_builtin_task_is_deterministic_correct_and_split_without_overlap() -> None:
    train, val = builtin.examples("train"), builtin.examples("val")
    assert len(train) > 15_000 and len(val) > 800
    prompts_train = {e.messages[-1][1] for e in train}
    assert len(prompts_train) == len(train)
    assert not prompts_train & {e.messages[-1][1] for e in val}
    for e in train[:3000] + val:
        assert e.response == e.answer == _solve(e.messages[-1][1])
        assert builtin.is_correct(e, f" {e.answer} ")
    builtin._CACHE.clear()
    assert builtin.examples("val") == val
    families = {e.messages[-1][1].split()[0] for e in val}
    assert families == {"What", "Which", "Reverse", "Sort", "How"}


def test_preference_pairs_are_right_and_plausibly_wrong() -> None:
    pairs = builtin.preference_pairs("val", seed=1)
    val = builtin.examples("val")
    assert len(pairs) == len(val) and pairs == builtin.preference_pairs("val", seed=1)
    assert pairs != builtin.preference_pairs("val", seed=2)
    for pair, example in zip(pairs, val, strict=True):
        assert pair.messages == example.messages and pair.chosen == example.answer
        assert pair.rejected != pair.chosen
        assert not builtin.is_correct(example, pair.rejected)
        if pair.chosen.isdigit():
            assert pair.rejected.isdigit() and abs(int(pair.rejected) - int(pair.chosen)) <= 10
        else:
            assert sorted(pair.rejected.replace(" ", "")) == sorted(pair.chosen.replace(" ", ""))


# --------------------------------------------------------------------------- pretrained


@pytest.fixture
def train_run(pretrained_run: Path) -> Path:
    return pretrained_run


def test_load_an_optarena_train_folder(train_run: Path) -> None:
    pre = load_pretrained(train_run)
    assert pre.kind == "optarena" and pre.context_length == 48
    state = torch.load(next((train_run / "checkpoints").glob("*.pt")), weights_only=True)
    for name, p in pre.model.state_dict().items():
        assert torch.equal(p, state["model"][name]), name
    tok = pre.tokenizer
    ids = tok.encode("What is 3 + 4?")
    assert tok.decode(ids) == "What is 3 + 4?" and tok.decode([*ids, tok.eos_id, 5]) == (
        "What is 3 + 4?"
    )
    assert tok.chat_template is None
    assert tok.prompt_text((("user", "Hi"),)) == "User: Hi\nAssistant: "
    assert tok.response_ids("4")[-1] == tok.eos_id
    one = load_pretrained(next((train_run / "checkpoints").glob("*.pt")))
    assert one.tokenizer.fingerprint == tok.fingerprint


def test_a_train_folder_without_its_tokenizer_rebuilds_it(train_run: Path, tmp_path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(train_run, copy)
    (copy / "tokenizer.json").unlink()
    assert (
        load_pretrained(copy).tokenizer.fingerprint
        == load_pretrained(train_run).tokenizer.fingerprint
    )


def test_not_a_model_is_a_one_line_error(tmp_path: Path, train_run: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model"):
        load_pretrained(tmp_path / "empty")
    junk = tmp_path / "x" / "checkpoints" / "step-00000001.pt"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a usable checkpoint"):
        load_pretrained(junk)
    with pytest.raises(UserError, match="no valid checkpoint"):
        load_pretrained(tmp_path / "x")
    with pytest.raises(UserError, match="no such file"):
        load_pretrained(tmp_path / "nothing")
    with pytest.raises(UserError, match="not a model"):
        load_pretrained(train_run / "summary.json")


@pytest.fixture
def hf_folder(hf_pretrained: Path) -> Path:
    return hf_pretrained


def test_load_a_hugging_face_folder(hf_folder: Path) -> None:
    pre = load_pretrained(hf_folder)
    assert pre.kind == "huggingface" and pre.context_length == 64
    assert pre.description["architecture"] == "GPT2LMHeadModel"
    model = pre.model.double()
    rows = [[5, 6, 7, 8, 9], [10, 11]]
    ids, mask = left_pad(rows, pre.tokenizer.pad_id)
    with torch.no_grad():
        logits, feats = model(ids, mask), model.features(ids, mask)
        for i, r in enumerate(rows):
            alone = model.hf(torch.tensor([r])).logits[0]
            torch.testing.assert_close(logits[i, -len(r) :], alone, rtol=0, atol=1e-9)
        assert feats.shape == (2, 5, 32)
        torch.testing.assert_close(model.hf.lm_head(feats), logits, rtol=0, atol=1e-9)
    assert pre.tokenizer.decode(pre.tokenizer.encode("Sort 3 1")) == "Sort 3 1"
    assert math.isfinite(float(logits.sum()))


def test_a_chat_template_is_used_when_the_tokenizer_has_one(hf_folder: Path, tmp_path) -> None:
    import shutil

    folder = tmp_path / "chat"
    shutil.copytree(hf_folder, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    config_path.write_text(json.dumps(config))
    tok = load_pretrained(folder).tokenizer
    assert tok.prompt_text((("user", "Hi"),)) == "<user>Hi<assistant>"
    assert tok.chat_format == "the tokenizer's chat template"
    assert tok.fingerprint != load_pretrained(hf_folder).tokenizer.fingerprint


def test_a_hugging_face_folder_that_is_not_a_causal_lm(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "distilbert"  # an encoder with no causal-LM head in transformers
    config = transformers.DistilBertConfig(
        vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32
    )
    transformers.DistilBertModel(config).save_pretrained(folder)
    with pytest.raises(UserError, match="not a causal language model"):
        load_pretrained(folder)
