"""The point-in-polygon test of the "(Detection) in zone" comparator.

Roboflow's comparator (evaluation_engine/detection/geometry.py in
roboflow_workflows 0.2.13) returns shapely's ``Point.within(Polygon)``.
This module computes the same result without shapely, apart from the
case that point_in_zone's NOTE names. A point is in a zone when it lies in
the polygon's interior, so a point on an edge or a vertex is not. Edges are
counted by the even-odd rule, as GEOS locates a point in a ring: a bow tie
contains its two lobes, and an area that the edges go around twice is
outside.
"""

import itertools
import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from workflows.blocks.base import shown

# Shewchuk's bound on the rounding error of a float orientation test
# ("Adaptive Precision Floating-Point Arithmetic and Fast Robust Geometric
# Predicates", 1997, ccwerrboundA). A determinant within it is recomputed
# exactly, so a point on an edge between non-integer vertices is found.
_EPSILON = 2.0**-53
_ORIENTATION_ERROR_BOUND = (3.0 + 16.0 * _EPSILON) * _EPSILON
# The maximum number of points of a zone. The test walks every edge for each
# detection, and the run's time limit is checked between statements, not
# within one test.
# A test of 10,000 edges took about 12 ms in CPython 3.11 on a 2-core Xeon
# VM, so 300 detections, the default max_detections, take about 3.6 s.
# Roboflow sets no limit; zones drawn by hand have tens of points.
MAX_ZONE_POINTS = 10_000


def point_in_zone(point: Any, zone: Any) -> bool:
    """Return whether ``point`` lies inside the polygon ``zone``.

    ``point`` is [x, y], and ``zone`` a list of [x, y] vertices that the
    polygon joins in order and back to the first. As in Roboflow, a longer
    point or vertex has its further items ignored, and an empty zone contains
    no point. Raises ValueError for a zone of one or two vertices, which
    shapely rejects too, a point or vertex that is not a pair of finite numbers, or
    a zone of more than MAX_ZONE_POINTS vertices.

    NOTE: GEOS finds some points inside a zone whose edges retrace each
    other and enclose no area, such as [[0, 2], [0, 0], [0, 2], [2, 2]];
    this test finds none inside such a zone.
    """
    x, y = _coordinates(point, "the point")
    ring = zone_ring(zone)
    if not ring:
        return False
    ring.append(ring[0])
    crossings = 0
    for (x1, y1), (x2, y2) in itertools.pairwise(ring):
        if x1 < x and x2 < x:
            continue
        if (x2, y2) == (x, y):
            return False
        if y1 == y and y2 == y:
            if min(x1, x2) <= x <= max(x1, x2):
                return False
            continue
        if (y1 > y) != (y2 > y):
            side = _orientation(x1, y1, x2, y2, x, y)
            if side == 0:
                return False
            # A ray from the point towards +x crosses the edge when the point
            # is left of the edge directed upwards.
            if (side > 0) == (y2 > y1):
                crossings += 1
    return crossings % 2 == 1


def zone_ring(zone: Any) -> list[tuple[float, float]]:
    """Return the [x, y] points of ``zone`` as floats.

    Raises ValueError for a value that is not a list of none, or 3 to
    MAX_ZONE_POINTS, points, or a point that is not a pair of finite numbers.
    """
    if not isinstance(zone, Sequence) or isinstance(zone, str):
        raise ValueError(f"the zone must be a list of [x, y] points, got {shown(zone)}")
    if len(zone) > MAX_ZONE_POINTS:
        raise ValueError(
            f"the zone has {len(zone)} points; at most {MAX_ZONE_POINTS} are "
            "allowed. Simplify the polygon"
        )
    if 0 < len(zone) < 3:
        raise ValueError(
            f"the zone has {len(zone)} points, but a polygon needs at least 3"
        )
    return [
        _coordinates(point, f"zone point {index}") for index, point in enumerate(zone)
    ]


def _coordinates(value: Any, name: str) -> tuple[float, float]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) < 2:
        raise ValueError(f"{name} must be [x, y], got {shown(value)}")
    try:
        x, y = float(value[0]), float(value[1])
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{name} must be [x, y] numbers, got {shown(value)}"
        ) from error
    except OverflowError as error:
        # An integer such as 10**400, which JSON allows.
        raise ValueError(
            f"{name} must be [x, y] numbers within a float's range, got {shown(value)}"
        ) from error
    if not (math.isfinite(x) and math.isfinite(y)):
        # float() reads "inf" and "nan", and the exact test cannot use them.
        raise ValueError(f"{name} must be [x, y] finite numbers, got {shown(value)}")
    return x, y


def _orientation(x1: float, y1: float, x2: float, y2: float, x: float, y: float) -> int:
    """Return 1 if (x, y) is left of the line from 1 to 2, -1 if right, 0 if on it."""
    left = (x2 - x1) * (y - y1)
    right = (y2 - y1) * (x - x1)
    determinant = left - right
    bound = _ORIENTATION_ERROR_BOUND * (abs(left) + abs(right))
    if determinant > bound:
        return 1
    if determinant < -bound:
        return -1
    exact = (Fraction(x2) - Fraction(x1)) * (Fraction(y) - Fraction(y1)) - (
        Fraction(y2) - Fraction(y1)
    ) * (Fraction(x) - Fraction(x1))
    return (exact > 0) - (exact < 0)
