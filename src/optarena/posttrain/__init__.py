"""Post-training: supervised fine-tuning (and RLHF) of a pretrained causal language model.

* :mod:`optarena.posttrain.pretrained` — a pretrained model from an ``optarena train`` (or
  ``optarena finetune``) output folder or a local Hugging Face causal-LM folder, behind one
  interface: the model, its tokenizer with a chat format, its context length;
* :mod:`optarena.posttrain.data` — prompt/response and chat JSONL, tokenized with the loss on
  the response tokens only, right-padded batches, a seeded sampler that resumes exactly;
* :mod:`optarena.posttrain.builtin` — the built-in offline task (one answer per prompt) and
  its preference pairs;
* :mod:`optarena.posttrain.generate` — batched greedy decoding and seeded sampling;
* :mod:`optarena.posttrain.remax` — the ReMax loss;
* :mod:`optarena.posttrain.sft` — :class:`~optarena.posttrain.sft.FinetuneRun`, the
  harness's :class:`~optarena.train.Run` for SFT, and :func:`~optarena.posttrain.sft.finetune`.
"""
