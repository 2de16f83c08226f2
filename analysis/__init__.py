"""What looks at a run or a trained model, apart from what trains it (`train/`): loading a trained
model (`analysis.evaluate`), the firing report (`analysis.spike_report`, `launch/spikes.py`), W8ASpike
calibration (`analysis.quantize`, `launch/quantize.py`), the run report
(`analysis.report`, `launch/report.py`) and the long-context evaluation
(`analysis.long_context`, `launch/evaluate.py`)."""
