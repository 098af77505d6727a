"""The paper's analyses (``denserc analyze``): gradient concentration per construction, heads (gates, removal,
locality), the L and lambda sweeps, the class-token decomposition and feature consistency (docs/analysis.md)."""
from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "AnalysisData": ".data", "Segment": ".data", "register_analysis_data": ".data", "analysis_data": ".data",
    "gini": ".stats", "top_share": ".stats", "concentration": ".stats", "gate_statistics": ".stats",
    "class_separation": ".stats", "gradient_analysis": ".gradients", "head_analysis": ".heads",
    "decomposition_analysis": ".decomposition", "consistency_analysis": ".decomposition",
    "delta_l_monte_carlo": ".decomposition",
})
