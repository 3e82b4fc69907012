"""Supervised fine-tuning: ``finetune(config) -> summary``, the SFT face of the harness.

:class:`FinetuneRun` is a :class:`~optarena.train.Run`: checkpoints, bit-exact resume,
divergence, ``metrics.jsonl``, the progress bar and ``summary.json`` are the harness's. What it
adds is the task: a pretrained model (:func:`~optarena.posttrain.pretrained.load_pretrained`),
prompt/response examples (the built-in task or JSONL), the cross-entropy of the response tokens
only (their mean over the step's batch, whatever the micro-batching and world size), and an
evaluation that reports that loss on fixed validation examples and, for tasks with one answer
per prompt, the exact-match accuracy of greedy responses.

The pretrained model is evaluated before the first step (``step 0`` of the evaluation curve),
so every summary holds the loss and accuracy fine-tuning started from.

Everything a run reads (the model, the data) is loaded and checked before its folder is
created: a bad ``--from`` or a bad JSONL line writes nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from optarena import distributed
from optarena.errors import UserError
from optarena.posttrain import builtin
from optarena.posttrain.data import (
    IGNORE,
    Example,
    ExampleSampler,
    TokenizedExamples,
    collate,
    read_jsonl,
    tokenize,
)
from optarena.posttrain.pretrained import Pretrained, load_pretrained
from optarena.train import Run, RunConfig, _check_optimizer_name, _check_range, _make_optimizer

FUNCTION = "optarena.posttrain.sft:finetune"  # what a sweep runs for fine-tuning runs


@dataclass
class FinetuneConfig(RunConfig):
    """A fine-tuning run: the loop's settings (:class:`~optarena.train.RunConfig`), the model
    it starts from and the examples."""

    pretrained: str = ""  # an optarena run folder or a Hugging Face model folder (--from)
    data: str = "builtin"  # builtin | a JSONL file of prompt/response or chat examples
    val_data: str | None = None  # JSONL; None: 1 in 20 examples of --data (by hash)
    eval_examples: int = 256  # validation examples for the response loss
    eval_generate: int = 128  # of them, decoded greedily for exact match (0: none)
    exact_match: bool | None = None  # None: when the task has one answer (builtin, "answer")
    warmup: float = 0.05

    _INTS = (*RunConfig._INTS, "eval_examples", "eval_generate")

    def validate(self) -> None:
        super().validate()
        _check_range("eval_examples", self.eval_examples, 1)
        _check_range("eval_generate", self.eval_generate, 0, hint=" (0: no exact match)")
        for key in ("pretrained", "data"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                raise UserError(
                    "which model? pass --from DIR (an `optarena train` output folder or a "
                    "Hugging Face model folder)"
                    if key == "pretrained"
                    else "config key 'data' must be 'builtin' or a JSONL file"
                )
        if self.val_data is not None and not isinstance(self.val_data, str):
            raise UserError(f"config key 'val_data' must be a path, not {self.val_data!r}")
        if self.exact_match not in (None, True, False):
            raise UserError(f"exact_match must be true or false, not {self.exact_match!r}")


def check_config(config: FinetuneConfig | dict[str, Any], optimizer: bool = True) -> Any:
    """Keys, types, ranges and (``optimizer``) the optimizer and its hyperparameters, without
    the model or data (what a sweep checks of every run before it starts any)."""
    import warnings

    from optarena.train import _stand_in_model

    values = config if isinstance(config, dict) else config.to_dict()
    config = FinetuneConfig.from_dict(values)
    _check_optimizer_name(config.optimizer)
    if optimizer:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _make_optimizer(config, _stand_in_model())
    return config


# --------------------------------------------------------------------------- data


@dataclass
class SFTData:
    """The tokenized training and validation examples, and where they came from."""

    source: str
    train: TokenizedExamples
    val: TokenizedExamples
    exact_match: bool

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "train_examples": len(self.train),
            "val_examples": len(self.val),
            "train_tokens": self.train.tokens,
            "train_response_tokens": self.train.response_tokens,
            "truncated_responses": self.train.truncated + self.val.truncated,
            "exact_match": self.exact_match,
            "padding": "right-padded to the longest row of each micro-batch (no packing)",
        }


def _hash_val(example: Example, one_in: int = 20) -> bool:
    key = repr((example.messages, example.response)).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % one_in == 0


def load_examples(config: FinetuneConfig) -> tuple[str, list[Example], list[Example], bool]:
    """(source, train, val, exact match) of the config's data."""
    if config.data == "builtin":
        if config.val_data is not None:
            raise UserError("--val-data goes with a --data JSONL file, not the built-in task")
        source = f"{builtin.NAME}-v{builtin.TASK_VERSION}"
        exact = True if config.exact_match is None else config.exact_match
        return source, builtin.examples("train"), builtin.examples("val"), exact
    examples = read_jsonl(config.data)
    if config.val_data is not None:
        train, val = examples, read_jsonl(config.val_data)
    else:
        train = [e for e in examples if not _hash_val(e)]
        val = [e for e in examples if _hash_val(e)]
        if not val or not train:
            raise UserError(
                f"{config.data}: {len(examples)} examples are too few to hold out 1 in 20 for "
                "validation; pass --val-data FILE.jsonl"
            )
    has_answers = all(e.answer is not None for e in val)
    exact = has_answers if config.exact_match is None else config.exact_match
    if exact and not has_answers:  # the response itself is the one answer
        val = [Example(e.messages, e.response, e.response, e.line) for e in val]
    return config.data, train, val, exact


def prepare(config: FinetuneConfig, pretrained: Pretrained) -> SFTData:
    """The examples tokenized for ``pretrained`` within ``seq_len``; one-line errors."""
    if config.seq_len > pretrained.context_length and pretrained.kind == "huggingface":
        raise UserError(
            f"seq_len {config.seq_len} is longer than the model's context of "
            f"{pretrained.context_length} tokens; pass --seq-len {pretrained.context_length}"
        )
    source, train, val, exact = load_examples(config)
    val_source = config.val_data or source
    tok = pretrained.tokenizer
    train_set = tokenize(train, tok, config.seq_len, source)
    val_set = tokenize(val[: config.eval_examples], tok, config.seq_len, val_source)
    return SFTData(source, train_set, val_set, exact)


# --------------------------------------------------------------------------- the run


@dataclass
class SFTBatch:
    """One optimizer step's examples: this rank's micro-batches (inputs, targets), the global
    batch's response tokens (the loss's denominator) and all its real tokens."""

    micro: list[tuple[Tensor, Tensor]]
    response_tokens: int
    tokens: int


class FinetuneRun(Run):
    """Supervised fine-tuning of a pretrained model on prompt/response examples."""

    def __init__(
        self,
        config: FinetuneConfig,
        par: Any = None,
        on_log: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__(config, par, on_log)
        self.pretrained: Pretrained | None = None
        self.data: SFTData | None = None

    def setup(self) -> dict[str, Any] | None:
        """The model and examples, loaded and checked before the folder is touched; then the
        harness's set-up; then, on a fresh start, the pretrained model's evaluation (step 0)."""
        self.pretrained = load_pretrained(self.config.pretrained)
        self.data = prepare(self.config, self.pretrained)
        finished = super().setup()
        if finished is None and self._resumed is None:
            metrics = self.eval_metrics()
            self.eval_curve.append({"step": 0, **metrics})
            self.log.log({"step": 0, **metrics})
        return finished

    def build(self) -> None:
        config, par = self.config, self.par
        assert self.pretrained is not None and self.data is not None
        torch.manual_seed(config.seed)
        self.model = self.pretrained.model.to(self.device)
        self.sampler = ExampleSampler(
            len(self.data.train), config.batch_size, config.seed, (par.rank, par.world)
        )
        self.hessian_rng = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        self.micro = config.batch_size // (config.grad_accum * par.world)
        self.pad_id = self.pretrained.tokenizer.pad_id

    def data_state(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "hessian_rng": self.hessian_rng.get_state()}

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.hessian_rng.set_state(state["hessian_rng"])

    # ----------------------------------------------------------------- a step

    def next_batch(self) -> SFTBatch:
        data = self.data.train
        rows = self.sampler.next_global()
        response = int(sum(len(data.ids[r]) - data.prompt_len[r] for r in rows))
        tokens = int(sum(len(data.ids[r]) - 1 for r in rows))
        mine = self.sampler.mine(rows)
        micro = []
        for m in range(self.config.grad_accum):
            x, y = collate(data, mine[m * self.micro : (m + 1) * self.micro], self.pad_id)
            micro.append((x.to(self.device), y.to(self.device)))
        return SFTBatch(micro, response, tokens)

    def step_tokens(self, batch: SFTBatch) -> int:
        return batch.tokens

    def forward_backward(self, batch: SFTBatch) -> Tensor:
        """The mean cross-entropy of the global batch's response tokens, back-propagated.

        Every micro-batch divides its sum by the global count, so the gradient is the one of
        the whole batch at once; with ``world`` ranks it is scaled by ``world`` because the
        data-parallel reduction averages the ranks' gradients."""
        scale = self.par.world / batch.response_tokens
        accum = self.config.grad_accum
        total = torch.zeros((), device=self.device)
        for m, (x, y) in enumerate(batch.micro):
            with self.par.accumulating(self.model, last=m == accum - 1):
                with self.autocast:
                    logits = self.model(x)
                ce = F.cross_entropy(
                    logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum"
                )
                (ce * scale).backward()
            total += ce.detach()
        return total.double() * scale  # the ranks' mean of this is the global mean

    def hessian_update(self, batch: SFTBatch) -> None:
        """Sophia's Gauss-Newton-Bartlett estimate on the response tokens: labels drawn from the
        model's own softmax at each of them."""
        scale = self.par.world / batch.response_tokens
        accum = self.config.grad_accum
        for m, (x, y) in enumerate(batch.micro):
            with self.par.accumulating(self.model, last=m == accum - 1):
                with self.autocast:
                    logits = self.model(x)
                flat, keep = logits.float().flatten(0, 1), y.flatten() != IGNORE
                with torch.no_grad():
                    probs = flat.softmax(-1)
                    u = torch.rand(len(flat), 1, generator=self.hessian_rng, device=self.device)
                    labels = torch.searchsorted(probs.cumsum(-1), u).squeeze(-1)
                    labels = labels.clamp_(max=flat.shape[-1] - 1)
                ce = F.cross_entropy(flat[keep], labels[keep], reduction="sum")
                (ce * scale).backward()
        if self.config.grad_clip:
            distributed.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.update_hessian()
        self.optimizer.zero_grad(set_to_none=True)

    # ----------------------------------------------------------------- evaluation

    def evaluate(self) -> dict[str, float]:
        """The mean cross-entropy of the validation responses' tokens, and the exact-match
        accuracy of greedy responses to the first ``eval_generate`` validation prompts."""
        model, par, device = self.model, self.par, self.device
        val = self.data.val
        model.eval()
        rows, weight = par.eval_indices(len(val))
        size = max(1, self.config.batch_size // par.world)
        total = torch.zeros((), device=device, dtype=torch.float64)
        with torch.no_grad(), self.autocast:
            for i in range(0, len(rows), size):
                chunk = rows[i : i + size].tolist()
                x, y = collate(val, chunk, self.pad_id)
                logits = model(x.to(device)).float()
                ce = F.cross_entropy(
                    logits.flatten(0, 1),
                    y.to(device).flatten(),
                    ignore_index=IGNORE,
                    reduction="none",
                ).view(len(chunk), -1)
                total += (ce.sum(1).double() * weight[i : i + size].to(device).double()).sum()
        metrics = {"val_loss": (par.sum(total) / val.response_tokens).item()}
        if self.data.exact_match and self.config.eval_generate:
            metrics["exact_match"] = self.exact_match()
        model.train()
        return metrics

    def exact_match(self) -> float:
        """The share of the first ``eval_generate`` validation prompts whose greedy response
        is their answer; the ranks split the prompts."""
        from optarena.posttrain.generate import generate

        val, par, tok = self.data.val, self.par, self.pretrained.tokenizer
        count = min(self.config.eval_generate, len(val))
        rows, weight = par.eval_indices(count)
        longest = max(len(val.ids[r]) - int(val.prompt_len[r]) for r in range(count))
        size = max(1, 2 * self.config.batch_size // par.world)
        correct = torch.zeros((), device=self.device)
        with torch.no_grad(), self.autocast:
            for i in range(0, len(rows), size):
                chunk = rows[i : i + size].tolist()
                prompts = [val.ids[r][: val.prompt_len[r]].tolist() for r in chunk]
                out = generate(
                    self.model, prompts, longest, tok.eos_id, tok.pad_id, temperature=0.0
                )
                for j, (r, ids) in enumerate(zip(chunk, out.responses(), strict=True)):
                    answer = val.examples[r].answer or ""
                    hit = tok.decode(ids).strip() == answer.strip()
                    correct += float(hit) * float(weight[i + j])
        return (par.sum(correct) / count).item()

    # ----------------------------------------------------------------- summary

    def summary_fields(self) -> dict[str, Any]:
        start = self.eval_curve[0] if self.eval_curve and self.eval_curve[0]["step"] == 0 else {}
        final = self.eval_curve[-1] if self.eval_curve else {}
        pre_loss, final_loss = start.get("val_loss"), self.final_val
        return {
            "task": "finetune",
            "pretrained": self.pretrained.describe(),
            "data": self.data.describe(),
            "pretrained_val_loss": pre_loss,
            "val_loss_gain": (
                pre_loss - final_loss if pre_loss is not None and final_loss is not None else None
            ),
            "pretrained_exact_match": start.get("exact_match"),
            "final_exact_match": final.get("exact_match")
            if final.get("step") == self.step
            else None,
        }


def finetune(
    config: FinetuneConfig | dict[str, Any],
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune one model and return its summary (also ``OUT/summary.json``); the
    counterpart of :func:`optarena.train.train`, sweepable the same way
    (``--function optarena.posttrain.sft:finetune``)."""
    config = check_config(config, optimizer=False)
    par = distributed.setup(config.parallel, config.device)
    try:
        return FinetuneRun(config, par, on_log).run()
    finally:
        par.close()


__all__ = ["FUNCTION", "FinetuneConfig", "FinetuneRun", "SFTData", "check_config", "finetune"]
