"""RLHF with ReMax (``optarena rlhf``): the policy starts from an SFT (or any) model and learns
from a reward, with a KL penalty to its frozen starting point.

Each step draws ``batch_size`` prompts (a seeded sampler), samples one response per prompt at
``temperature`` from a seeded generator, decodes the greedy response (the baseline), scores both
with the reward, and back-propagates the ReMax loss (:mod:`optarena.posttrain.remax`). The
reward is a trained reward model (:mod:`optarena.posttrain.reward_model`) or, for prompts with
one answer, exact match (1 for the answer, 0 otherwise).

:class:`RLHFRun` is a :class:`~optarena.train.Run`: checkpoints hold the sampler's and the
generator's states, so a resumed run draws the same prompts and responses and ends bit-exact.
Training records log the sampled responses' mean ``reward``, the greedy ``baseline_reward``,
``kl`` (the sample estimate Σ_t log π/π_ref per response) and ``response_length``. An
evaluation decodes the held-out prompts greedily and logs ``reward``, ``accuracy`` (exact match,
when the prompts have answers), ``response_length`` and ``kl`` (of responses sampled with a
generator seeded the same at every evaluation); its ``val_loss`` is the negative mean reward,
so that sweeps and reports that rank runs by loss rank them by reward. The SFT model's own
evaluation (step 0) is in the summary as ``initial``, with the gain over it and its 95%
interval (paired over the held-out prompts).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import scipy.stats
import torch
from torch import Tensor

from optarena.errors import UserError
from optarena.posttrain.data import jsonl_records
from optarena.posttrain.generate import Generation, generate, token_logprobs
from optarena.posttrain.remax import remax_loss
from optarena.posttrain.reward import ExactMatchReward, ModelReward, Reward
from optarena.train import Run, RunConfig, _check_range, _check_types

REWARDS = ("model", "exact-match")


@dataclass(frozen=True)
class Prompt:
    """A prompt's chat messages, its one answer when known, and its source line."""

    messages: tuple[tuple[str, str], ...]
    answer: str | None = None
    line: int = 0


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts of a JSONL file: ``{"prompt": ..., "answer": ...}`` (answer optional) per line;
    a pairs file (``prompt``, ``chosen``, ``rejected``) or an SFT file (``prompt``,
    ``response``) works too, its responses unused. One-line errors name the line."""
    path = Path(path).expanduser()
    out = []
    for record, where, number in jsonl_records(path, "prompts file"):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f'{where}: no string prompt; expected {{"prompt": ...}}')
        answer = record.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise UserError(f"{where}: answer must be a string")
        out.append(Prompt((("user", record["prompt"]),), answer, number))
    if len(out) < 2:
        raise UserError(
            f"prompts file {path} has {len(out)} prompt(s); RLHF needs at least 2 (one JSON "
            "object per line), some of which are held out for evaluation"
        )
    return out


def load_prompts(source: str, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, held-out prompts): the built-in task's splits, or a seeded tenth of
    a file held out."""
    if source == "builtin":
        from optarena.posttrain import builtin

        def convert(split: str) -> list[Prompt]:
            return [Prompt(e.messages, e.answer) for e in builtin.examples(split)]

        return convert("train"), convert("val")
    prompts = read_prompts(source)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    held = max(1, round(0.1 * len(prompts)))
    return [prompts[i] for i in order[held:]], [prompts[i] for i in sorted(order[:held])]


@dataclass
class RLHFConfig(RunConfig):
    """An RLHF run: the loop's settings (:class:`~optarena.train.RunConfig`), the policy's
    starting model (``pretrained``), the reward, the prompts and ReMax's settings. ``seq_len``
    is not used (each batch is as long as its prompts and responses)."""

    pretrained: str = ""
    reward: str = "model"  # model | exact-match
    reward_model: str | None = None  # an `optarena reward` folder (reward = model)
    prompts: str = "builtin"  # builtin | a JSONL file of {"prompt", "answer"?}
    max_new_tokens: int = 16
    temperature: float = 1.0
    kl_coef: float = 0.05
    eval_prompts: int = 128  # held-out prompts evaluated (the first ones)
    steps: int = 100
    batch_size: int = 16
    lr: float | None = 1e-4
    schedule: str = "constant"
    warmup: float = 0.0

    _INTS = (*RunConfig._INTS, "max_new_tokens", "eval_prompts")
    _FLOATS = (*RunConfig._FLOATS, "temperature", "kl_coef")

    def validate(self) -> None:
        super().validate()
        _check_types(self, ("max_new_tokens", "eval_prompts"), ("temperature", "kl_coef"))
        _check_range("max_new_tokens", self.max_new_tokens, 1)
        _check_range("eval_prompts", self.eval_prompts, 1)
        _check_range("kl_coef", self.kl_coef, 0, hint=" (0 disables the KL penalty)")
        if not self.temperature > 0:
            raise UserError(f"temperature must be more than 0, not {self.temperature:g}")
        if not isinstance(self.pretrained, str) or not self.pretrained.strip():
            raise UserError("which policy? pass --from SFT_DIR (an optarena finetune folder)")
        if self.reward not in REWARDS:
            raise UserError(f"reward must be one of {', '.join(REWARDS)}, not {self.reward!r}")
        if self.reward == "model" and not self.reward_model:
            raise UserError(
                "--reward model needs --reward-model DIR (train one with `optarena reward`), "
                "or pass --reward exact-match"
            )
        if self.reward == "exact-match" and self.reward_model:
            raise UserError("--reward exact-match takes no --reward-model")
        if not isinstance(self.prompts, str) or not self.prompts.strip():
            raise UserError("prompts must be builtin or a JSONL file")
        if self.parallel != "none":
            raise UserError("rlhf runs in one process: parallel must be none")


class RLHFRun(Run):
    """ReMax against a reward, with a KL penalty to the frozen starting model."""

    def load_inputs(self) -> None:
        """The policy, the reward and the prompts, each checked (one-line errors)."""
        from optarena.posttrain.pretrained import load_pretrained

        config = self.config
        self.pretrained = load_pretrained(config.pretrained)
        tok = self.tokenizer = self.pretrained.tokenizer
        self.reward_info: dict[str, Any] = {"kind": config.reward}
        self.reward = self.make_reward()
        train, held_out = load_prompts(config.prompts, config.seed)
        held_out = held_out[: config.eval_prompts]
        source = "builtin" if config.prompts == "builtin" else config.prompts
        self.dropped = 0
        self.train_ids, train = self.encode(train, source)
        self.eval_ids, held_out = self.encode(held_out, source)
        self.train_answers = [p.answer for p in train]
        self.eval_answers = [p.answer for p in held_out]
        if config.reward == "exact-match" and any(a is None for a in self.train_answers):
            raise UserError(
                f"--reward exact-match needs an answer for every prompt; {source} has prompts "
                'without one (add "answer" to each line, or use --reward-model)'
            )
        self.has_answers = all(a is not None for a in self.eval_answers)
        self.matcher = ExactMatchReward(tok.decode, tok.eos_id)

    def build(self) -> None:
        from optarena.posttrain.data import ExampleSampler

        config = self.config
        self.load_inputs()  # before the folder is made (Run.make_out): bad input writes nothing
        torch.manual_seed(config.seed)
        self.model = self.pretrained.model.to(self.device)
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.sampler = ExampleSampler(len(self.train_ids), config.batch_size, config.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        self.micro = config.batch_size // config.grad_accum
        self.initial: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] = {}
        self.stats: dict[str, float] = {}
        self._tokens = 0

    def make_reward(self) -> Reward:
        config = self.config
        if config.reward == "exact-match":
            return ExactMatchReward(self.tokenizer.decode, self.tokenizer.eos_id)
        from optarena.posttrain.reward_model import load_reward_model

        loaded = load_reward_model(config.reward_model, self.tokenizer.fingerprint)
        self.reward_info.update(loaded.description)
        return ModelReward(loaded.model.to(self.device))

    def encode(
        self, prompts: Sequence[Prompt], source: str
    ) -> tuple[list[list[int]], list[Prompt]]:
        """Each prompt in the chat format, and the prompts kept. A prompt of a file that
        leaves no room for ``max_new_tokens`` in the model's context is an error naming its
        line; the built-in task's such prompts are left out (and counted)."""
        context, new = self.pretrained.context_length, self.config.max_new_tokens
        ids_out, kept = [], []
        for p in prompts:
            ids = self.tokenizer.prompt_ids(p.messages)
            if len(ids) + new > context:
                if source == "builtin":
                    self.dropped += 1
                    continue
                raise UserError(
                    f"{source}:{p.line}: the prompt is {len(ids)} tokens; with max_new_tokens "
                    f"{new} it exceeds the model's context of {context} (shorten it or lower "
                    "--max-new-tokens)"
                )
            ids_out.append(ids)
            kept.append(p)
        if not kept:
            raise UserError(
                f"--prompts {source}: no prompt leaves room for max_new_tokens {new} in the "
                f"model's context of {context} (lower --max-new-tokens)"
            )
        return ids_out, kept

    # ----------------------------------------------------------------- state

    def data_state(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler.state_dict(),
            "generator": self.generator.get_state(),
            "initial_eval": json.dumps(self.initial),
            "last_eval": json.dumps(self.last_eval),
        }

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])
        self.initial = json.loads(state["initial_eval"])
        self.last_eval = json.loads(state["last_eval"])

    # ----------------------------------------------------------------- one step

    def policy(self) -> torch.nn.Module:
        return self.par.unwrap(self.model)

    def respond(
        self, prompts: list[list[int]], temperature: float, generator: torch.Generator | None
    ) -> Generation:
        tok = self.tokenizer
        with self.autocast:
            return generate(
                self.policy(),
                prompts,
                self.config.max_new_tokens,
                tok.eos_id,
                tok.pad_id,
                temperature,
                generator,
            )

    def score(self, generation: Generation, answers: Sequence[str | None]) -> Tensor:
        with self.autocast:
            return self.reward(generation, answers).float()

    def next_batch(self) -> list[int]:
        if self.initial is None:  # the starting model's evaluation, before its first update
            self.initial = self.eval_metrics()
        return self.sampler.next_global()

    def forward_backward(self, rows: list[int]) -> Tensor:
        config = self.config
        # dropout (a Hugging Face model's) stays off: the responses and the log-probabilities
        # of the loss come from the same policy
        self.model.eval()
        prompts = [self.train_ids[r] for r in rows]
        answers = [self.train_answers[r] for r in rows]
        sampled = self.respond(prompts, config.temperature, self.generator)
        greedy = self.respond(prompts, 0.0, None)
        rewards, baseline = self.score(sampled, answers), self.score(greedy, answers)
        mask = sampled.response_mask()
        width = int(sampled.lengths.max())
        tokens, mask = sampled.tokens[:, :width], mask[:, : width - 1]
        total_tokens = mask.sum().clamp(min=1)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        kl = torch.zeros(len(rows), device=self.device)
        for m in range(config.grad_accum):
            part = slice(m * self.micro, (m + 1) * self.micro)
            with self.autocast:
                logp = token_logprobs(self.model, tokens[part])
                with torch.no_grad():
                    ref_logp = token_logprobs(self.reference, tokens[part])
            terms = remax_loss(
                logp, ref_logp, mask[part], rewards[part], baseline[part], config.kl_coef
            )
            share = mask[part].sum() / total_tokens  # the batch's token mean over micro-batches
            (terms.loss * share).backward()
            loss_sum += (terms.loss.detach() * share).double()
            kl[part] = terms.kl.float()
        self._tokens = int(sampled.lengths.sum())
        self.stats = {
            "reward": rewards.mean().item(),
            "baseline_reward": baseline.mean().item(),
            "kl": kl.mean().item(),
            "response_length": sampled.response_lengths.float().mean().item(),
        }
        return loss_sum

    def step_tokens(self, batch: Any) -> int:
        return self._tokens

    def is_diverged(self, loss: float) -> bool:
        """A non-finite loss or reward (the ReMax loss has no scale to compare with)."""
        return not math.isfinite(loss) or not math.isfinite(self.stats.get("reward", 0.0))

    def log_fields(self) -> dict[str, float]:
        return dict(self.stats)

    def after_step(self) -> None:
        super().after_step()
        if self.stats and not self.diverged:  # the bar shows the reward, not ReMax's loss
            reward, kl = self.stats["reward"], self.stats["kl"]
            self.bar.set_postfix(reward=f"{reward:.3f}", kl=f"{kl:.2f}", refresh=False)

    # ----------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Greedy responses to the held-out prompts: mean reward (``val_loss`` is its
        negative), accuracy, response length; and the KL of sampled responses."""
        size, ids, answers = self.config.batch_size, self.eval_ids, self.eval_answers
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed + 2)
        rewards, hits, lengths, kls = [], [], [], []
        for i in range(0, len(ids), size):
            prompts, truth = ids[i : i + size], answers[i : i + size]
            greedy = self.respond(prompts, 0.0, None)
            rewards += self.score(greedy, truth).tolist()
            lengths += greedy.response_lengths.tolist()
            if self.has_answers:
                hits += self.matcher.matches(greedy, truth)
            sampled = self.respond(prompts, self.config.temperature, generator)
            with self.autocast:
                logp = token_logprobs(self.policy(), sampled.tokens)
                ref_logp = token_logprobs(self.reference, sampled.tokens)
            mask = sampled.response_mask()
            kls += ((logp.float() - ref_logp.float()) * mask).sum(1).tolist()
        reward = sum(rewards) / len(rewards)
        metrics: dict[str, Any] = {
            "val_loss": -reward,
            "reward": reward,
            "response_length": sum(lengths) / len(lengths),
            "kl": sum(kls) / len(kls),
        }
        if self.has_answers:
            metrics["accuracy"] = sum(hits) / len(hits)
        self.last_eval = {**metrics, "rewards": rewards}
        return metrics

    def summary_fields(self) -> dict[str, Any]:
        final = self.last_eval
        initial = self.initial or {}
        gain = None
        if final.get("rewards") and initial.get("rewards"):
            gain = paired_gain(initial["rewards"], final["rewards"])
        strip = ("rewards",)
        return {
            "task": "rlhf",
            "pretrained": self.pretrained.describe(),
            "reward": self.reward_info,
            "prompts": {
                "source": self.config.prompts,
                "train": len(self.train_ids),
                "held_out": len(self.eval_ids),
                "too_long": self.dropped,  # built-in prompts left out: no room to respond
            },
            "initial": {k: v for k, v in initial.items() if k not in strip},
            "final": {k: v for k, v in final.items() if k not in strip},
            "final_reward": final.get("reward"),
            # the keys fine-tuning runs share (the sweep's report reads them)
            "pretrained_val_loss": initial.get("val_loss"),
            "pretrained_exact_match": initial.get("accuracy"),
            "final_exact_match": final.get("accuracy"),
            "reward_gain": gain,
            "eval_rewards": {"initial": initial.get("rewards"), "final": final.get("rewards")},
        }

    def eval_metrics(self) -> dict[str, Any]:
        metrics = super().eval_metrics()
        if self.initial is None:  # the starting model's: kept with its per-prompt rewards
            return {**metrics, "rewards": self.last_eval["rewards"]}
        return metrics


def paired_gain(before: Sequence[float], after: Sequence[float]) -> dict[str, float]:
    """Mean of ``after − before`` over the same prompts, with its Student-t 95% interval."""
    diffs = [b - a for a, b in zip(before, after, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return {"mean": mean, "low": -math.inf, "high": math.inf, "n": n}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(scipy.stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def rlhf(
    config: RLHFConfig | dict[str, Any],
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ReMax and return the summary (also ``OUT/summary.json``); ``on_log`` receives
    every record of ``metrics.jsonl``."""
    return RLHFRun(check_config(config, optimizer=True), None, on_log).run()


def check_config(config: RLHFConfig | dict[str, Any], optimizer: bool = True) -> RLHFConfig:
    """Keys, types, ranges and (``optimizer``) the optimizer and its hyperparameters over a
    stand-in model, without the models or prompts (what a sweep checks before it starts)."""
    from optarena.posttrain.reward_model import check_optimizer

    values = config if isinstance(config, dict) else config.to_dict()
    checked = RLHFConfig.from_dict(values)
    check_optimizer(checked, optimizer)
    return checked
