"""The report a Backend or ``rewrite`` fills in: pattern matches, per-pass records, compile time, notes."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PassRecord:
    name: str
    seconds: float
    changed: bool
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # traceback of a pass that failed (non-strict mode) and was rolled back
    graph: int = 0  # which compiled graph (graph breaks give several)


@dataclass
class Report:
    matches: dict[str, int] = field(default_factory=dict)
    passes: list[PassRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    near_misses: list = field(default_factory=list)  # patterns.NearMiss: what nearly matched, and why not
    plugins: list = field(default_factory=list)  # plugins.PluginRecord: what each installed plugin registered
    graphs: int = 0
    compile_seconds: float = 0.0
    pipeline_seconds: float = 0.0

    def add_matches(self, counts: dict[str, int]) -> None:
        for name, n in counts.items():
            self.matches[name] = self.matches.get(name, 0) + n

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def errors(self) -> list[PassRecord]:
        return [r for r in self.passes if r.error]

    def pass_seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for r in self.passes:
            out[r.name] = out.get(r.name, 0.0) + r.seconds
        return out

    def __str__(self) -> str:
        lines = [f"fxpasses report: {self.graphs} graph(s), compile {self.compile_seconds:.3f} s, "
                 f"pipeline {self.pipeline_seconds:.3f} s"]
        lines += ["", "| pass | graph | ms | changed | counts | notes |", "|---|---|---|---|---|---|"]
        for r in self.passes:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(r.counts.items())) or "-"
            notes = "; ".join(r.notes) or "-"
            if r.error:
                notes = f"FAILED, rolled back: {r.error.strip().splitlines()[-1]}"
            lines.append(f"| {r.name} | {r.graph} | {r.seconds * 1e3:.2f} | {'yes' if r.changed else 'no'} | "
                         f"{counts} | {notes} |")
        if self.matches:
            lines += ["", "matches: " + ", ".join(f"{k}={v}" for k, v in sorted(self.matches.items()))]
        for m in self.near_misses:
            lines.append(f"near miss: {m}")
        for p in self.plugins:
            lines.append(str(p))
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)
