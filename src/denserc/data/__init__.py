"""Training data: image sources (COCO, image folder, generated, proposals), square resizing, grid and proposal sampling,
the teacher's crops cut in the loader."""
from ..lazy import lazy_exports

# name -> the submodule that defines it (imported on first use: docs/architecture.md, "Start-up")
__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "IMAGE_EXTENSIONS": ".datasets", "GeneratedSource": ".datasets", "ImageSource": ".datasets",
    "TrainingImages": ".datasets", "UnreadableImageError": ".datasets", "build_source": ".datasets",
    "list_images": ".datasets", "register_source": ".datasets", "source_types": ".datasets", "GRID_RULES": ".grid",
    "draw_seed": ".grid", "grid_boxes": ".grid", "sample_grid_boxes": ".grid", "sample_grid_shape": ".grid",
    "ASPECT_MODES": ".transforms", "SquareResize": ".transforms", "ProposalSource": ".proposals",
    "sample_proposal_boxes": ".proposals", "LetterboxResize": ".transforms",
    "TEACHER_CROPS": ".regions", "RegionDraw": ".regions", "SourceCrops": ".regions",
    "collate_regions": ".regions",
})
