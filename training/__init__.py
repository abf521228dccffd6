"""Trainers (``python -m training.train_tokenizer``) and the parts they share.

Shared by every trainer: ``config`` (dataclass -> flags), ``distributed`` (torchrun setup, rank 0),
``ema``, ``checkpointing`` (exact resume after ``kill -9``) and ``progress`` (bar, log.jsonl,
TensorBoard). The tokenizer's own recipe lives in ``data``, ``losses`` and ``tokenizer_recipe``.
"""
