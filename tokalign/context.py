"""What a stage sees besides the config (``tokalign/pipeline.py`` builds it; ``tokalign/distributed.py`` rebuilds
it in a torchrun child)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tokalign.tracking import NullTracker


@dataclass
class Context:
    """What a stage sees besides the config: where upstream outputs are, the tracker, the run directory."""

    run_dir: Path
    tracker: Any = field(default_factory=NullTracker)
    outputs: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def path(self, stage: str) -> Optional[Path]:
        """Output folder of an upstream stage, or None when that stage was skipped."""
        return self.outputs.get(stage)
