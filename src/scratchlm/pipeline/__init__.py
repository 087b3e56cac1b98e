"""`scratchlm run`, the main job: raw text to an evaluated, instruction-tuned, exported model.

    run.py     the settings, the chain of stages and the driver (resume, --stages, --skip)
    report.py  the report card: report.json, report.md and a self-contained report.html
"""

from scratchlm.pipeline.run import STAGES, RunSettings, run_pipeline

__all__ = ["STAGES", "RunSettings", "run_pipeline"]
