"""Training frameworks on the session API (workers/session.py): each reports its metrics and
checkpoints through `session.report` and resumes from `session.restore()`.

- `workers.integrations.lightning`: PyTorch Lightning (a `CheckpointIO` plugin and a callback)
- `workers.integrations.huggingface`: the Hugging Face `Trainer` (a `TrainerCallback`)

Each module imports its framework; import the one you use (`pip install
'ray-orchestrator[integrations]'` brings both).
"""
