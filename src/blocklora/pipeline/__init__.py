"""The few-shot application's one path for a run: prepare.py (config -> backbone -> adapters -> data, all checked
before anything is written) -> run.py (train, evaluate, save) with evaluation.py (zero-shot before, adapted after);
trained.py uses a saved adapter (eval, predict, export); demo.py is the offline demo on that path."""
