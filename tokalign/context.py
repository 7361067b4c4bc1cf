"""What a stage sees besides the config (``tokalign/pipeline.py`` builds it; ``tokalign/distributed.py`` rebuilds
it in a torchrun child)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tokalign.errors import TokalignError
from tokalign.tracking import NullTracker


class StageInputError(TokalignError, LookupError):
    """A stage asked for an upstream output it does not declare in ``STAGES``, or one that did not run."""


@dataclass
class Context:
    """What a stage sees besides the config: where upstream outputs are, the tracker, the run directory.

    The pipeline sets ``stage`` and ``inputs`` (the stage's declared inputs in ``STAGES``) before each stage
    runs; then ``path`` and ``has`` refuse a name that is not declared. A Context built by hand (tests,
    scripts) leaves ``inputs`` None and is not checked.
    """

    run_dir: Path
    tracker: Any = field(default_factory=NullTracker)
    outputs: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    stage: Optional[str] = None  # the stage now running
    inputs: Optional[tuple[str, ...]] = None  # what it declares it reads (None: not checked)

    def _declared(self, name: str) -> None:
        if self.inputs is not None and name not in self.inputs:
            raise StageInputError(f"stage '{self.stage}' reads the output of stage '{name}' but does not declare it "
                                  f"(its inputs in STAGES, tokalign/pipeline.py: {', '.join(self.inputs) or 'none'})")

    def has(self, stage: str) -> bool:
        """Whether an upstream stage that this one declares produced an output (False when it was skipped)."""
        self._declared(stage)
        return stage in self.outputs

    def path(self, stage: str) -> Path:
        """Output folder of an upstream stage; a ``StageInputError`` when it is undeclared or did not run."""
        self._declared(stage)
        if stage not in self.outputs:
            raise StageInputError(f"stage '{self.stage or '?'}' needs the output of stage '{stage}', which did not "
                                  "run (skipped, or not in this pipeline)")
        return self.outputs[stage]
