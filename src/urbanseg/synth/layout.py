"""Street-scene layout for `urbanseg synth`: the street cross-section, background,
ground, buildings, street furniture, traffic and people, as shapes in painter's order
(far to near), plus ground shadows and the global lighting of the scene.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from urbanseg.synth.scene import (
    BUILDING,
    CAR,
    CLOTHES,
    FENCE,
    GREY,
    MISC,
    POLE,
    ROAD,
    SIDEWALK,
    SIGN,
    SKY,
    TERRAIN,
    VEGETATION,
    WALL,
    Camera,
    Scene,
    Shape,
    blob,
    box_hull,
    front_poly,
    person_outline,
    pick,
    two_wheeler_outline,
)


def compose(rng: np.random.Generator, width: int, height: int) -> Scene:
    """A random street scene of `width` x `height` pixels, shapes in drawing order."""
    cam = Camera(
        f=width * rng.uniform(1.0, 1.15),
        xv=width * rng.uniform(0.42, 0.58),
        yh=height * rng.uniform(0.4, 0.46),
        cam_h=rng.uniform(1.2, 1.45),
        width=width,
        height=height,
    )
    street = _street(rng)
    shapes = _background(rng, cam, street)
    shapes += _ground(rng, cam, street)
    shapes += _buildings(rng, cam, street)
    items = _street_objects(rng, cam, street) + _vehicles(rng, cam, street) + _people(rng, cam, street)
    items.sort(key=lambda item: -item[0])  # painter's order: far first, near ones occlude
    for _, group in items:
        shapes += group
    shapes += _frame(rng, cam)
    light = {
        "sunny": bool(rng.random() < 0.55),
        "exposure": rng.uniform(0.65, 1.3),
        "white": rng.uniform(0.88, 1.12, 3),
        "fog": rng.uniform(60, 400),
        "blur": rng.uniform(0.3, 1.6) * width / 2048,
        "noise": rng.uniform(0.004, 0.025),
        "vignette": rng.uniform(0.0, 0.35),
        "gamma": rng.uniform(0.85, 1.15),
    }
    shadows = _shadows(rng, cam, street, items) if light["sunny"] else []
    return Scene(cam, shapes, shadows, light)


@dataclass(frozen=True)
class Side:
    """One side of the street: the distance |X| in metres from the centre line to the outer
    edge of the road, the parking strip, the sidewalk, the grass verge and the building line."""

    road: float
    parking: float  # strip width, 0 when there is none
    walk: float
    verge: float  # == walk when there is no verge
    build: float
    kind: str  # "city" (buildings) or "park" (trees on grass)
    walk_color: Any
    kerb_color: Any


@dataclass(frozen=True)
class Street:
    """The street's cross-section: lane dividers' X, both sides, far end, colours, crossing."""

    lanes: list[float]
    zfar: float
    left: Side
    right: Side
    road_color: Any
    crossing: float | None  # distance of a zebra crossing, or None
    # Boxes (x0, x1, z0, z1, height) of the vehicles and people placed so far: they cast
    # the ground shadows, drawn after everything is placed.
    casters: list[tuple[float, float, float, float, float]] = field(default_factory=list)

    def side(self, s: int) -> Side:
        """s = -1: the left side, +1: the right side (X grows to the right)."""
        return self.left if s < 0 else self.right


def _street(rng: np.random.Generator) -> Street:
    """A random cross-section (random draws in a fixed order: the same seed, the same street)."""
    lanes_l, lanes_r = rng.integers(0, 3), rng.integers(0, 2)
    lanes = [3.2 * k for k in range(-lanes_l, lanes_r + 1)]
    sides = []
    for s in (-1, 1):
        road = 1.6 + 3.2 * (lanes_l if s < 0 else lanes_r) + rng.uniform(0, 0.8)
        parking = rng.uniform(2.0, 2.5) if rng.random() < 0.35 else 0.0
        walk = road + parking + 0.15 + rng.uniform(1.8, 4.5)
        verge = walk + (rng.uniform(0.8, 3.0) if rng.random() < 0.45 else 0.0)
        sides.append(
            Side(
                road=road,
                parking=parking,
                walk=walk,
                verge=verge,
                build=verge + rng.uniform(0, 0.6),
                kind="park" if rng.random() < 0.15 else "city",
                walk_color=pick(rng, SIDEWALK),
                kerb_color=pick(rng, GREY),
            )
        )
    road_color = pick(rng, ROAD)
    crossing = rng.uniform(12, 45) if rng.random() < 0.4 else None
    return Street(lanes, 320.0, sides[0], sides[1], road_color, crossing)


def _strip(cam: Camera, x0: float, x1: float, z0: float, z1: float) -> np.ndarray:
    return cam.project([x0, x1, x1, x0], 0.0, [z0, z0, z1, z1])


def _background(rng: np.random.Generator, cam: Camera, street: Street) -> list[Shape]:
    """Sky, then a far skyline (buildings and trees) at the end of the street."""
    W, H = cam.width, cam.height
    zen, hor = pick(rng, SKY), pick(rng, SKY[1:])
    shapes = [
        Shape(
            "sky",
            np.array([[0, 0], [W, 0], [W, H], [0, H]], float),
            "sky",
            ("sky",),
            {"color": zen, "color2": hor, "clouds": rng.uniform(0, 0.6)},
        )
    ]
    zf = street.zfar
    x = -rng.uniform(150, 250)
    while x < 250:
        w, h = rng.uniform(8, 40), rng.uniform(4, 35)
        label, tex, pal = (
            ("vegetation", "foliage", VEGETATION) if rng.random() < 0.3 else ("building", "facade", BUILDING)
        )
        outline = blob(rng, w / 2, h, 10) if label == "vegetation" else np.array([[0, 0], [w, 0], [w, h], [0, h]])
        if label == "vegetation":
            outline[:, 1] = np.abs(outline[:, 1])
            outline[:, 0] += w / 2
        shapes.append(
            Shape(label, front_poly(cam, zf, x, 0.0, outline), tex, ("front", zf, x, 0.0), _facade_params(rng, pal))
        )
        x += w * rng.uniform(0.6, 1.1)
    return shapes


def _facade_params(rng: np.random.Generator, palette: list) -> dict:
    return {
        "color": pick(rng, palette),
        "color2": pick(rng, GREY + SKY),
        "bricks": bool(rng.random() < 0.3),
        "floor": rng.uniform(2.9, 3.6),
        "bay": rng.uniform(1.8, 3.2),
        "win": rng.uniform(0.35, 0.6),
        "shop": bool(rng.random() < 0.4),
        "rough": rng.uniform(0.03, 0.12),
    }


def _ground(rng: np.random.Generator, cam: Camera, street: Street) -> list[Shape]:
    """Land behind the buildings, the road, parking strips, kerbs, sidewalks and verges."""
    zf, z0 = street.zfar, 0.3
    shapes = []
    for s in (-1, 1):
        side = street.side(s)
        back = "terrain" if side.kind == "park" or rng.random() < 0.5 else "ground"
        shapes.append(
            Shape(
                back,
                _strip(cam, s * side.build, s * 300, z0, zf),
                "grass",
                ("ground",),
                {"color": pick(rng, TERRAIN if back == "terrain" else SIDEWALK)},
            )
        )
    road = {
        "color": street.road_color,
        "lanes": street.lanes,
        "edges": (-street.side(-1).road, street.side(1).road),
        "crossing": street.crossing,
        "dash": rng.uniform(3, 6),
        "marks": pick(rng, [(0.9, 0.9, 0.88), (0.85, 0.75, 0.3)]),
    }
    shapes.append(
        Shape("road", _strip(cam, -street.side(-1).road, street.side(1).road, z0, zf), "asphalt", ("ground",), road)
    )
    for s in (-1, 1):
        side = street.side(s)
        a = side.road
        if side.parking:
            shapes.append(
                Shape(
                    "parking",
                    _strip(cam, s * a, s * (a + side.parking), z0, zf),
                    "pavers",
                    ("ground",),
                    {"color": pick(rng, ROAD + SIDEWALK), "tile": rng.uniform(0.15, 0.3)},
                )
            )
            a += side.parking
        shapes.append(
            Shape(
                "sidewalk", _strip(cam, s * a, s * (a + 0.15), z0, zf), "kerb", ("ground",), {"color": side.kerb_color}
            )
        )
        shapes.append(
            Shape(
                "sidewalk",
                _strip(cam, s * (a + 0.15), s * side.walk, z0, zf),
                "pavers",
                ("ground",),
                {"color": side.walk_color, "tile": rng.uniform(0.25, 0.6)},
            )
        )
        # the kerb's vertical face, 12 cm high, seen from the road
        face = cam.project([s * a, s * a, s * a, s * a], [0, 0.12, 0.12, 0], [z0, z0, zf, zf])
        shapes.append(Shape("sidewalk", face, "kerb", ("side", s * a), {"color": side.kerb_color}))
        if side.verge > side.walk:
            shapes.append(
                Shape(
                    "terrain",
                    _strip(cam, s * side.walk, s * side.verge, z0, zf),
                    "grass",
                    ("ground",),
                    {"color": pick(rng, TERRAIN)},
                )
            )
    return shapes


def _buildings(rng: np.random.Generator, cam: Camera, street: Street) -> list[Shape]:
    """Facades along both sides (far to near), with walls and fences in the gaps; parks
    get a fence or hedge instead. Backyard trees, drawn first, show through the gaps."""
    far: list[tuple[float, list[Shape]]] = []
    near: list[tuple[float, list[Shape]]] = []
    for s in (-1, 1):
        side = street.side(s)
        xb = side.build
        for z in np.arange(rng.uniform(5, 25), 160, rng.uniform(12, 25)):
            far.append((z, _tree(rng, cam, s * (xb + rng.uniform(2, 12)), z, big=True)))
        if side.kind == "park":
            near.append((1e3, _barrier(rng, cam, s, xb, 0.5, rng.uniform(60, 200), fence=rng.random() < 0.6)))
            continue
        z = rng.uniform(-2, 3)
        zend = rng.uniform(50, 200)
        while z < zend:
            length = rng.uniform(8, 30)
            if rng.random() < 0.1:  # a gap between houses, maybe closed by a wall or fence
                if rng.random() < 0.7:
                    near.append((z + length, _barrier(rng, cam, s, xb, z, z + length, fence=rng.random() < 0.5)))
                z += length * 0.6
                continue
            near.append((z + length, _house(rng, cam, s, xb + rng.uniform(0, 1.2), z, z + length)))
            z += length
    shapes = []
    for _, group in sorted(far, key=lambda t: -t[0]) + sorted(near, key=lambda t: -t[0]):
        shapes += group
    return shapes


def _house(rng: np.random.Generator, cam: Camera, s: int, xb: float, z0: float, z1: float) -> list[Shape]:
    """One building: the end wall facing the camera, then the facade along the street."""
    h = rng.uniform(8, 28)
    depth = rng.uniform(8, 15)
    params = {**_facade_params(rng, BUILDING), "top": h, "roof": pick(rng, [(0.45, 0.2, 0.15)] + GREY)}
    near_end = z0 > 1.0
    z0 = max(z0, 0.4)
    end = cam.project([s * xb, s * (xb + depth), s * (xb + depth), s * xb], [0, 0, h, h], z0)
    side = cam.project(s * xb, [0, h, h, 0], [z0, z0, z1, z1])
    if rng.random() < 0.35:  # a pitched roof: the ridge line above the facade
        r = rng.uniform(1.5, 4)
        side = cam.project(s * np.array([xb, xb, xb + 2, xb + 2, xb]), [0, h, h + r, h + r, 0], [z0, z0, z0, z1, z1])
    facade = Shape("building", side, "facade", ("side", s * xb), params)
    return [Shape("building", end, "facade", ("front", z0, s * xb, 0.0), params), facade] if near_end else [facade]


def _barrier(
    rng: np.random.Generator, cam: Camera, s: int, xb: float, z0: float, z1: float, fence: bool
) -> list[Shape]:
    """A wall or a fence along the street at |X| = xb, from z0 to z1."""
    h = rng.uniform(1.0, 2.0) if fence else rng.uniform(1.2, 3.0)
    poly = cam.project(s * xb, [0, h, h, 0], [max(z0, 0.4)] * 2 + [z1] * 2)
    if fence:
        return [
            Shape(
                "fence",
                poly,
                "fence",
                ("side", s * xb),
                {"color": pick(rng, FENCE), "color2": pick(rng, VEGETATION + GREY), "slat": rng.uniform(0.08, 0.3)},
            )
        ]
    return [
        Shape(
            "wall",
            poly,
            "wall",
            ("side", s * xb),
            {"color": pick(rng, WALL), "graffiti": pick(rng, MISC + SIGN), "amount": rng.uniform(0, 0.4)},
        )
    ]


def _tree(rng: np.random.Generator, cam: Camera, x: float, z: float, big: bool = False) -> list[Shape]:
    """Trunk and crown, both `vegetation` as in Cityscapes."""
    trunk_h = rng.uniform(1.8, 4.0) * (1.5 if big else 1.0)
    r = rng.uniform(1.4, 3.2) * (1.4 if big else 1.0)
    tw = rng.uniform(0.12, 0.25)
    trunk = front_poly(
        cam, z, x, 0.0, [[-tw, 0], [tw, 0], [tw * 0.7, trunk_h + r * 0.5], [-tw * 0.7, trunk_h + r * 0.5]]
    )
    crown = blob(rng, r, r * rng.uniform(0.8, 1.4), 16, 0.22)
    crown[:, 1] += trunk_h + r
    return [
        Shape("vegetation", trunk, "bark", ("front", z, x, 0.0), {"color": pick(rng, [(0.3, 0.24, 0.18)] + GREY[:2])}),
        Shape(
            "vegetation",
            front_poly(cam, z, x, 0.0, crown),
            "foliage",
            ("front", z, x, 0.0),
            {"color": pick(rng, VEGETATION), "color2": pick(rng, VEGETATION)},
        ),
    ]


Item = tuple[float, list[Shape]]  # (depth for painter's order, shapes drawn together)


def _street_objects(rng: np.random.Generator, cam: Camera, street: Street) -> list[Item]:
    """Street trees, lamp posts, signs, traffic lights, bins and bollards along the sidewalks."""
    items: list[Item] = []
    for s in (-1, 1):
        side = street.side(s)
        kerb = side.road + side.parking + 0.5
        for z in np.arange(rng.uniform(3, 15), 120, rng.uniform(7, 16)):
            if rng.random() < 0.55:
                items.append((z, _tree(rng, cam, s * rng.uniform(kerb, side.verge + 0.5), z)))
        for z in np.arange(rng.uniform(6, 25), 150, rng.uniform(22, 40)):
            items.append((z, _lamp(rng, cam, s, kerb - 0.2, z)))
        for _ in range(rng.integers(0, 3)):
            z = rng.uniform(6, 60)
            items.append((z, _sign(rng, cam, s * (kerb - 0.1), z)))
        for _ in range(rng.integers(0, 3)):
            z, x = rng.uniform(6, 50), s * rng.uniform(kerb, side.walk)
            w, h = rng.choice([(0.5, 1.0), (0.15, 0.9), (1.6, 0.8), (0.8, 1.3)])
            label = "dynamic" if rng.random() < 0.2 else "static"
            items.append(
                (
                    z,
                    [
                        Shape(
                            label,
                            front_poly(cam, z, x, 0.0, [[-w / 2, 0], [w / 2, 0], [w / 2, h], [-w / 2, h]]),
                            "paint",
                            ("front", z, x, 0.0),
                            {"color": pick(rng, MISC)},
                        )
                    ],
                )
            )
    z = street.crossing or rng.uniform(15, 50)
    for s in (-1, 1):  # traffic lights at the junction
        if rng.random() < 0.7:
            items.append((z, _traffic_light(rng, cam, s * (street.side(s).road + street.side(s).parking + 0.3), z, s)))
    return items


def _lamp(rng: np.random.Generator, cam: Camera, s: int, x: float, z: float) -> list[Shape]:
    h, w, arm = rng.uniform(5, 9), rng.uniform(0.05, 0.1), rng.uniform(0.8, 2.5)
    outline = [[-w, 0], [w, 0], [w, h - 0.3], [-s * arm, h - 0.1], [-s * arm, h + 0.15], [-w, h]]
    if s < 0:
        outline = [[-w, 0], [w, 0], [w, h], [arm, h + 0.15], [arm, h - 0.1], [-w, h - 0.3]]
    return [
        Shape(
            "pole",
            front_poly(cam, z, s * x, 0.0, outline),
            "paint",
            ("front", z, s * x, 0.0),
            {"color": pick(rng, POLE)},
        )
    ]


def _sign(rng: np.random.Generator, cam: Camera, x: float, z: float) -> list[Shape]:
    h, r = rng.uniform(2.2, 3.2), rng.uniform(0.3, 0.45)
    pole = front_poly(cam, z, x, 0.0, [[-0.04, 0], [0.04, 0], [0.04, h], [-0.04, h]])
    kind = rng.integers(3)
    if kind == 0:
        t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
        face = np.stack([r * np.cos(t), h + r * np.sin(t)], -1)
    elif kind == 1:
        face = np.array([[-r, h + r * 0.6], [r, h + r * 0.6], [0, h - r * 1.1]])
    else:
        face = np.array([[-r, h - r], [r, h - r], [r, h + r * 0.8], [-r, h + r * 0.8]])
    return [
        Shape("pole", pole, "paint", ("front", z, x, 0.0), {"color": pick(rng, POLE)}),
        Shape(
            "traffic sign",
            front_poly(cam, z, x, 0.0, face),
            "sign",
            ("front", z, x, h),
            {"color": pick(rng, SIGN), "color2": pick(rng, SIGN), "r": r},
        ),
    ]


def _traffic_light(rng: np.random.Generator, cam: Camera, x: float, z: float, s: int) -> list[Shape]:
    h = rng.uniform(2.8, 4.5)
    shapes = [
        Shape(
            "pole",
            front_poly(cam, z, x, 0.0, [[-0.07, 0], [0.07, 0], [0.07, h], [-0.07, h]]),
            "paint",
            ("front", z, x, 0.0),
            {"color": pick(rng, POLE)},
        )
    ]
    box = [[-0.18, h - 0.4], [0.18, h - 0.4], [0.18, h + 0.6], [-0.18, h + 0.6]]
    shapes.append(
        Shape(
            "traffic light",
            front_poly(cam, z, x, 0.0, box),
            "light",
            ("front", z, x, h - 0.4),
            {"color": pick(rng, [(0.1, 0.1, 0.1), (0.25, 0.25, 0.25), (0.7, 0.6, 0.12)]), "lit": int(rng.integers(3))},
        )
    )
    if rng.random() < 0.5:  # a second head hanging over the road from a cantilever
        reach = -s * rng.uniform(2.5, 5)
        arm = [[0, h + 0.9], [reach, h + 0.9], [reach, h + 1.05], [0, h + 1.05]]
        shapes.append(
            Shape("pole", front_poly(cam, z, x, 0.0, arm), "paint", ("front", z, x, 0.0), {"color": pick(rng, POLE)})
        )
        box = [[reach - 0.18, h - 0.1], [reach + 0.18, h - 0.1], [reach + 0.18, h + 0.9], [reach - 0.18, h + 0.9]]
        shapes.append(
            Shape(
                "traffic light",
                front_poly(cam, z, x, 0.0, box),
                "light",
                ("front", z, x + reach, h - 0.1),
                {"color": pick(rng, [(0.1, 0.1, 0.1), (0.25, 0.25, 0.25)]), "lit": int(rng.integers(3))},
            )
        )
    return shapes


# (w, h, L, cabin?) ranges of each vehicle kind, metres
_VEHICLES = {
    "car": ((1.7, 1.95), (1.4, 1.6), (3.9, 4.8)),
    "truck": ((2.3, 2.55), (2.8, 3.8), (6.5, 10)),
    "bus": ((2.5, 2.55), (3.0, 3.3), (11, 13)),
}


def _vehicles(rng: np.random.Generator, cam: Camera, street: Street) -> list[Item]:
    """Traffic in every lane, cars parked along the kerbs, cyclists and motorcyclists."""
    items: list[Item] = []
    for c in street.lanes:
        for z in np.arange(rng.uniform(12 if c == 0 else 7, 35), 160, rng.uniform(12, 30)):
            if rng.random() < 0.45:
                u = rng.random()
                if u < 0.08:
                    items.append(
                        (z, _rider(rng, cam, c + rng.uniform(-0.8, 0.8), z, motor=rng.random() < 0.6, street=street))
                    )
                else:
                    kind = "car" if u < 0.9 else ("truck" if u < 0.95 else "bus")
                    items.append((z, _box_vehicle(rng, cam, kind, c + rng.uniform(-0.3, 0.3), z, street)))
    for s in (-1, 1):
        side = street.side(s)
        if side.parking or rng.random() < 0.3:
            xc = s * (side.road + side.parking / 2) if side.parking else s * (side.road - 1.1)
            for z in np.arange(rng.uniform(3, 10), 90, rng.uniform(5, 7)):
                if rng.random() < 0.4:
                    items.append((z, _box_vehicle(rng, cam, "car", xc + rng.uniform(-0.2, 0.2), z, street, group=True)))
        if rng.random() < 0.5:
            items.append(
                (
                    rng.uniform(6, 40),
                    _rider(rng, cam, s * (side.road - 0.8), rng.uniform(6, 40), motor=False, street=street),
                )
            )
        for _ in range(rng.integers(0, 3)):  # bicycles parked on the sidewalk, seen from the side
            z, x = rng.uniform(5, 40), s * rng.uniform(side.road + side.parking + 0.5, side.walk)
            motor = rng.random() < 0.3
            outline = two_wheeler_outline(1.7 if not motor else 2.0, 1.05, motor)
            items.append(
                (
                    z,
                    [
                        Shape(
                            "motorcycle" if motor else "bicycle",
                            front_poly(cam, z, x, 0.0, outline),
                            "bike",
                            ("front", z, x, 0.0),
                            {"color": pick(rng, CAR)},
                        )
                    ],
                )
            )
    return items


def _box_vehicle(
    rng: np.random.Generator, cam: Camera, kind: str, xc: float, z: float, street: Street, group: bool = False
) -> list[Shape]:
    (w0, w1), (h0, h1), (l0, l1) = _VEHICLES[kind]
    w, h, L = rng.uniform(w0, w1), rng.uniform(h0, h1), rng.uniform(l0, l1)
    x0, x1 = xc - w / 2, xc + w / 2
    if kind == "car":  # body box plus a narrower cabin: the hull gives a car's outline
        body = box_hull(cam, x0, x1, z, z + L, 0.0, h * 0.6)
        cabin = box_hull(cam, x0 + 0.12 * w, x1 - 0.12 * w, z + 0.25 * L, z + 0.75 * L, h * 0.6, h)
        import cv2

        hull = cv2.convexHull(np.concatenate([body, cabin]).astype(np.float32))[:, 0, :].astype(np.float64)
    else:
        hull = box_hull(cam, x0, x1, z, z + L, 0.0, h)
    street.casters.append((x0, x1, z, z + L, h))
    params = {
        "color": pick(rng, CAR if kind == "car" else CAR + SIGN),
        "kind": kind,
        "w": w,
        "h": h,
        "L": L,
        "glass": pick(rng, [(0.1, 0.12, 0.15), (0.25, 0.3, 0.35), (0.4, 0.45, 0.5)]),
    }
    # far beyond ~55 m annotators outline parked cars as a group: labelled car, no instance id
    label = "cargroup" if group and z > 55 else kind
    shapes = [Shape(label, hull, "vehicle", ("box", z, x0, x1, L), params)]
    if kind != "bus" and rng.random() < 0.8:  # not drawn in labelIds (id -1), like the real annotations
        plate = front_poly(cam, z, xc, 0.0, [[-0.26, 0.42], [0.26, 0.42], [0.26, 0.53], [-0.26, 0.53]])
        shapes.append(Shape("license plate", plate, "paint", ("front", z, xc, 0.0), {"color": (0.85, 0.85, 0.8)}))
    return shapes


def _rider(rng: np.random.Generator, cam: Camera, x: float, z: float, motor: bool, street: Street) -> list[Shape]:
    """A bicycle or motorcycle seen from behind, its rider seated on it."""
    bw = 0.35 if not motor else 0.45
    bike = np.array(
        [[-0.05, 0], [0.05, 0], [0.05, 0.6], [bw, 0.95], [bw, 1.02], [-bw, 1.02], [-bw, 0.95], [-0.05, 0.6]]
    )
    if motor:
        bike = np.array(
            [
                [-0.1, 0],
                [0.1, 0],
                [0.1, 0.3],
                [0.3, 0.4],
                [0.3, 0.85],
                [0.45, 1.0],
                [-0.45, 1.0],
                [-0.3, 0.85],
                [-0.3, 0.4],
                [-0.1, 0.3],
            ]
        )
    h = rng.uniform(1.6, 1.9)
    rider = person_outline(rng, h, seated=True)
    street.casters.append((x - 0.3, x + 0.3, z, z + 1.8, 1.7))
    label = "motorcycle" if motor else "bicycle"
    return [
        Shape(label, front_poly(cam, z, x, 0.0, bike), "bike", ("front", z, x, 0.0), {"color": pick(rng, CAR)}),
        Shape(
            "rider",
            front_poly(cam, z - 0.05, x, 0.8, rider),
            "person",
            ("front", z - 0.05, x, 0.8),
            _clothes(rng, h, offset=0.78 * h / 1.75),
        ),
    ]


def _clothes(rng: np.random.Generator, height: float, offset: float = 0.0) -> dict:
    """Trousers, top, skin and hair colours; `offset`: height of the outline's v=0 above the feet."""
    skin = [(0.85, 0.65, 0.5), (0.55, 0.38, 0.27), (0.35, 0.24, 0.18)]
    hair = [(0.1, 0.08, 0.06), (0.5, 0.35, 0.2), (0.75, 0.65, 0.4)]
    return {
        "color": pick(rng, CLOTHES),
        "color2": pick(rng, CLOTHES),
        "skin": pick(rng, skin),
        "hair": pick(rng, hair),
        "height": height,
        "offset": offset,
    }


def _people(rng: np.random.Generator, cam: Camera, street: Street) -> list[Item]:
    """Pedestrians on both sidewalks (at least one fairly near), some crossing the road."""
    spots = []
    for s in (-1, 1):
        side = street.side(s)
        a, b = side.road + side.parking + 0.4, side.walk - 0.2
        spots += [(s * rng.uniform(a, b), rng.uniform(5, 70)) for _ in range(rng.integers(0, 5))]
    s = 1 if rng.random() < 0.5 else -1
    spots.append(
        (
            s * rng.uniform(street.side(s).road + street.side(s).parking + 0.4, street.side(s).walk - 0.2),
            rng.uniform(7, 18),
        )
    )
    if street.crossing:
        spots += [
            (rng.uniform(-street.side(-1).road, street.side(1).road), street.crossing + rng.uniform(0, 3))
            for _ in range(rng.integers(0, 5))
        ]
    items = []
    for x, z in spots:
        h = rng.uniform(1.55, 1.95) if rng.random() < 0.85 else rng.uniform(1.0, 1.4)
        street.casters.append((x - 0.25, x + 0.25, z, z + 0.3, h))
        outline = person_outline(rng, h)
        items.append(
            (
                z,
                [
                    Shape(
                        "person", front_poly(cam, z, x, 0.0, outline), "person", ("front", z, x, 0.0), _clothes(rng, h)
                    )
                ],
            )
        )
    return items


def _frame(rng: np.random.Generator, cam: Camera) -> list[Shape]:
    """The ego vehicle's bonnet at the bottom, then the rectification border (both void)."""
    W, H = cam.width, cam.height
    bh = H * rng.uniform(0.05, 0.1)
    cx = W * rng.uniform(0.45, 0.55)
    xs = np.linspace(-0.02 * W, 1.02 * W, 24)
    ys = H - bh * np.clip(1 - ((xs - cx) / (0.62 * W)) ** 2, 0.15, 1)
    bonnet = np.concatenate([np.stack([xs, ys], -1), [[1.02 * W, H + 5], [-0.02 * W, H + 5]]])
    shapes = [Shape("ego vehicle", bonnet, "ego", ("screen", cx, H - bh, bh), {"color": pick(rng, CAR)})]
    t = [rng.uniform(0.002, 0.012) * W for _ in range(3)]
    bottom = H * rng.uniform(0.005, 0.02)
    shapes.append(
        Shape(
            "rectification border",
            np.array([[-2, -2], [t[0], -2], [t[0] * 0.4, H * 0.5], [t[1], H + 2], [-2, H + 2]]),
            "paint",
            ("screen", 0, 0, 1),
            {"color": (0.0, 0.0, 0.0)},
        )
    )
    shapes.append(
        Shape(
            "rectification border",
            np.array([[W + 2, -2], [W - t[2], -2], [W - t[2] * 0.3, H * 0.6], [W - t[1], H + 2], [W + 2, H + 2]]),
            "paint",
            ("screen", 0, 0, 1),
            {"color": (0.0, 0.0, 0.0)},
        )
    )
    shapes.append(
        Shape(
            "out of roi",
            np.array([[-2, H - bottom], [W * 0.5, H - bottom * 0.5], [W + 2, H - bottom], [W + 2, H + 2], [-2, H + 2]]),
            "paint",
            ("screen", 0, 0, 1),
            {"color": (0.02, 0.02, 0.02)},
        )
    )
    return shapes


def _shadows(rng: np.random.Generator, cam: Camera, street: Street, items: list[Item]) -> list[np.ndarray]:
    """Ground shadows (image polygons) of vehicles, people and trees under a low sun."""
    import cv2

    sx, sz = rng.uniform(-1.2, 1.2), rng.uniform(-0.6, 1.2)
    out = []
    for x0, x1, z0, z1, h in street.casters:
        X = np.array([x0, x1, x1, x0, x0 + sx * h, x1 + sx * h, x1 + sx * h, x0 + sx * h])
        Z = np.array([z0, z0, z1, z1, z0 + sz * h, z0 + sz * h, z1 + sz * h, z1 + sz * h])
        Z = np.maximum(Z, 0.5)
        pts = cam.project(X, 0.0, Z).astype(np.float32)
        out.append(cv2.convexHull(pts)[:, 0, :].astype(np.float64))
    for s in (-1, 1):  # the buildings on the sun's side shade a band of street
        if street.side(s).kind == "city" and s * sx < 0:
            width = min(abs(sx) * rng.uniform(6, 20), street.side(s).build + street.side(-s).build)
            out.append(
                _strip(cam, s * street.side(s).build, s * (street.side(s).build - width), 0.5, rng.uniform(30, 200))
            )
    return out
