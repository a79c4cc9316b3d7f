"""What a rewrite found and did: every stream and residual site, rewritten or refused, and why.

The report is plain data (saved as JSON, shown by the CLI): :meth:`SiteReport.of` and :meth:`StreamReport.of`
take it from the detection's :class:`~hc_rewrite.sites.Site` and :class:`~hc_rewrite.sites.Stream`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class SiteReport:
    """A :class:`~hc_rewrite.sites.Site` without its graph nodes: every field is the site's attribute of the
    same name."""

    name: str  # the residual add's node name in the captured graph
    module: str  # module path the add was traced in
    branch_module: str  # module path of the branch's last op
    kind: str  # pre-norm / post-norm
    rewritten: bool
    reason: str = ""  # why it was refused (empty when rewritten)
    stream: int | None = None
    index: int | None = None
    placed: str = ""  # structure-preserving form: how the site was placed on the module tree

    @classmethod
    def of(cls, site) -> "SiteReport":
        return cls(**{f.name: getattr(site, f.name) for f in fields(cls)})


@dataclass
class StreamReport:
    id: int
    width: int
    sites: int
    start: str  # node where the stream is expanded
    layout: str = "channels-last"
    ends: list = field(default_factory=list)  # "value -> reader" for every reader of the reduced stream

    @classmethod
    def of(cls, stream) -> "StreamReport":
        return cls(id=stream.id, width=stream.width, sites=len(stream.sites), start=stream.root.name,
                   layout="channels-first" if stream.feature_dim == 1 else "channels-last",
                   ends=[f"{v} -> {u}" for v, u in stream.ends])


@dataclass
class RewriteReport:
    model: str
    variant: str
    n: int
    dynamic: bool
    capture: str
    sites: list = field(default_factory=list)
    streams: list = field(default_factory=list)
    new_parameters: int = 0
    form: str = "module"  # "module": the user's model with hooks; "graph": one flat GraphModule
    init_rel_err: float | None = None  # module form: measured at rewrite time on the example call
    check: str = ""  # why the numeric check did not run, if it did not (the meta device)
    shapes: str = "dynamic"  # the capture's shapes: "dynamic", or "static shapes: <why>" (specialised to the example)
    existing: list = field(default_factory=list)  # streams that already are hyper-connections (find_hyper_streams)
    flavour: str = ""  # mHC's production flavour and its constants ("" for the paper's math)

    @property
    def rewritten(self) -> list:
        return [s for s in self.sites if s.rewritten]

    @property
    def refused(self) -> list:
        return [s for s in self.sites if not s.rewritten]

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The sites as a fixed-width text table."""
        head = ("stream", "site", "module", "branch", "kind", "status")
        rows = []
        for s in self.sites:
            status = "rewritten" if s.rewritten else f"refused: {s.reason}"
            rows.append((
                "-" if s.stream is None else str(s.stream), "-" if s.index is None else str(s.index),
                s.module or "<root>", s.branch_module or "<root>", s.kind, status,
            ))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
        widths[-1] = len(head[-1])
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        spec = f"{self.variant} n={self.n} {'dynamic' if self.dynamic else 'static'}"
        if self.flavour:
            spec += f" ({self.flavour})"
        lines = [
            f"hc_rewrite report: {self.model} -> {spec}, {self.form} form (captured with {self.capture})",
            f"{len(self.streams)} stream(s), {len(self.sites)} residual site(s): "
            f"{len(self.rewritten)} rewritten, {len(self.refused)} refused; "
            f"{self.new_parameters:,} new parameters"
            + ("" if self.init_rel_err is None else f"; checked against the original: rel. error {self.init_rel_err:.1e}"),
        ]
        if self.check:
            lines.append(f"  check: {self.check}")
        for e in self.existing:
            lines.append(f"  already hyper-connected: {e}")
        if self.shapes != "dynamic":
            lines.append(f"  capture: {self.shapes}")
        for st in self.streams:
            readers = ", ".join(st.ends) if st.ends else "-"
            lines.append(f"  stream {st.id}: width {st.width} ({st.layout}), {st.sites} site(s), "
                         f"expanded at {st.start}; reduced for: {readers}")
        if self.sites:
            lines += ["", self.table()]
        special = [s for s in self.rewritten if s.placed.startswith("functional") or "calls per forward" in s.placed]
        if special:  # placements beyond "a pre-hook on the branch's first submodule"
            lines += ["", "placed:"] + [f"  {s.name}: {s.placed}" for s in special]
        return "\n".join(lines)
