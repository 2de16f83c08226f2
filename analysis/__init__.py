"""What looks at a run or a trained model, apart from what trains it (`train/`): the run report
(`analysis.report`, `launch/report.py`) and the long-context evaluation
(`analysis.long_context`, `launch/evaluate.py`)."""
