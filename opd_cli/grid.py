"""Grid experiments: `opd run -m experiment=matrix seed=0,1,2` runs every cell of a grid preset.

A grid preset (conf/experiment/matrix*.yaml) lists its cells, which are ordinary experiment presets, in
`hydra.sweeper.params.experiment`. `opd run` expands the grid into that list before Hydra sees it, so the
sweep is Hydra's own (`experiment=cell_a,cell_b,...` times any other sweep on the command line). An
override of a config group the cells differ in (loss, teacher, model, stabilization, task) selects the
cells whose choice is in the given list; any other override applies to every cell:

    opd run -m experiment=matrix loss=topk_rkl,topk_rkl_stopgrad    # the cells using those two losses
    opd run -m experiment=matrix rollout=vllm seed=0,1,2            # every cell, on vLLM, three seeds
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from opd_cli.errors import UsageError

# Config groups a grid's cells may differ in; an override of one of them is a cell filter.
AXES = ("task", "model", "teacher", "loss", "stabilization")


@dataclass
class Expansion:
    overrides: list[str]  # what Hydra receives
    grids: list[str]  # grid presets that were expanded
    cells: list[str]  # the selected cells, in the grid's order
    total: int  # cells in the grids before selection
    filters: list[str]  # overrides that acted as cell filters


def grid_cells(conf_dir: Path, name: str) -> list[str] | None:
    """The cells of the grid preset `name`, or None when `name` is a plain experiment."""
    path = conf_dir / "experiment" / f"{name}.yaml"
    if not path.is_file():
        return None
    params = OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.params", default=None)
    if not params or "experiment" not in params:
        return None
    return [c.strip() for c in str(params["experiment"]).split(",") if c.strip()]


def _values(override) -> list[str]:
    if override.is_sweep_override():
        return [str(v) for v in override.sweep_string_iterator()]
    return [str(override.value())]


def expand_grid(overrides: list[str], multirun: bool, conf_dir: Path, choices_of) -> Expansion | None:
    """Rewrite `experiment=<grid>` (and axis filters) into a plain Hydra sweep; None if no grid is named.

    `choices_of(cell)` returns the cell's group choices ({"loss": "topk_rkl", ...}); it composes the
    cell, so it is only called when a filter needs it.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - a bad override: prevalidation reports it in one line
        return None
    exp = [o for o in parsed if o.get_key_element().lstrip("+") == "experiment"]
    if not exp:
        return None
    names = _values(exp[-1])
    grids = [n for n in names if grid_cells(conf_dir, n) is not None]
    if not grids:
        return None
    if not multirun:
        raise UsageError(
            f"experiment={grids[0]} is a grid of {len(grid_cells(conf_dir, grids[0]))} cells; run it as a "
            f"sweep: opd run -m experiment={grids[0]} (or pick one cell: experiment=<cell>)"
        )
    cells: list[str] = []
    for n in names:
        for cell in grid_cells(conf_dir, n) or [n]:
            if cell not in cells:
                cells.append(cell)
    total = len(cells)

    rest, filters = [], []
    exp_ids = {id(o) for o in exp}
    axis_overrides = [o for o in parsed if o.get_key_element() in AXES and id(o) not in exp_ids]
    if axis_overrides:
        choices = {cell: choices_of(cell) for cell in cells}
        for o in axis_overrides:
            key = o.get_key_element()
            if len({choices[c].get(key) for c in cells}) > 1:  # the grid varies this axis: a filter
                wanted = _values(o)
                cells = [c for c in cells if choices[c].get(key) in wanted]
                filters.append(o.input_line)
        if not cells:
            raise UsageError(
                f"no cell of experiment={','.join(grids)} matches {' '.join(filters)}; the cells use "
                + "; ".join(
                    f"{o.get_key_element()}: {', '.join(sorted({str(v.get(o.get_key_element())) for v in choices.values()}))}"
                    for o in axis_overrides
                    if o.input_line in filters
                )
            )
    for o in parsed:
        if id(o) in exp_ids or o.input_line in filters:
            continue
        rest.append(o.input_line)
    return Expansion(
        overrides=[f"experiment={','.join(cells)}", *rest],
        grids=grids,
        cells=cells,
        total=total,
        filters=filters,
    )
