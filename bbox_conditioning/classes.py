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
