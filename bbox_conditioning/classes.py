"""The drivesim object class vocabulary shared by datasets, box tokens and exports.

Index order is part of the checkpoint format (class embeddings are indexed by it): append, never reorder.
nuScenes categories and MetaDrive vehicle types are mapped onto these names by their readers.
"""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = (
    "car",
    "van",
    "truck",
    "bus",
    "trailer",
    "construction_vehicle",
    "motorcycle",
    "bicycle",
    "pedestrian",
    "traffic_cone",
    "barrier",
)
CLASS_TO_ID: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}
VEHICLE_CLASSES: frozenset[str] = frozenset(
    {"car", "van", "truck", "bus", "trailer", "construction_vehicle", "motorcycle"}
)

# Crowdedness (number of vehicles in the clip) is bucketed before embedding: [0], [1, 2], [3, 5], [6, 9], [10, inf).
CROWDEDNESS_BUCKET_EDGES: tuple[int, ...] = (1, 3, 6, 10)


def crowdedness_bucket(count: int) -> int:
    """Bucket index in [0, len(CROWDEDNESS_BUCKET_EDGES)] for a vehicle count (int >= 0)."""
    return sum(count >= edge for edge in CROWDEDNESS_BUCKET_EDGES)


def check_class_ids(classes, num_classes: int) -> None:
    """Raise ValueError if a class id in `classes` (an int64 tensor; invalid slots already zeroed) lies outside
    [0, num_classes). On the CPU the check reads the values; on an accelerator it is queued as a device-side
    assertion (`torch._assert_async`), so the forward pass never waits for the device (no host sync)."""
    import torch

    if not classes.numel():
        return
    if classes.device.type == "cpu":
        lo, hi = int(classes.min()), int(classes.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"box class ids must be in [0, {num_classes}), got {lo}..{hi}")
    else:
        torch._assert_async(((classes >= 0) & (classes < num_classes)).all(),
                            f"box class ids must be in [0, {num_classes})")
