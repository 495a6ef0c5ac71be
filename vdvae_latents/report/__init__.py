"""Report: one self-contained HTML page per run, with everything made from it.

:func:`write_report` (``vdvl report``) gathers the model (metadata and training curve), the KL
analysis and pruning sweep of an ACTIVE.json, stores (sizes and verification), a probe report
and out-of-distribution results into one page: figures embedded as PNG ``data:`` URIs, no
script, nothing fetched, printable. ``inputs`` checks what it is given (and documents the OOD
file's schema), ``sections`` reads each part, ``figures`` draws the report's own figures and
``page`` renders the Jinja2 template in ``templates/``.
"""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "page": ["write_report", "render"],
    "inputs": ["check_inputs", "json_kind", "check_ood_rows", "OOD_FIELDS"],
    "sections": ["read_metrics"],
})
