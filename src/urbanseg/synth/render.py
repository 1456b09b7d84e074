"""Rasterising and painting a synthetic scene (see synth_layout.py).

Labels are rasterised with PIL's ImageDraw.polygon (`urbanseg.imaging.draw_polygons`) on
integer polygons clipped to the image, in the order they are listed, exactly as
cityscapesscripts' json2labelImg does,
so the JSON polygons reproduce labelIds bit for bit. The photo uses the same polygons
(one object-index map), then paints every pixel from the 3D surface it belongs to:
each pixel is mapped back to metres on its plane (ground, facade, object front) and a
texture is evaluated there, so bricks, pavers, lane markings and windows follow the
perspective. Everything is vectorised over the pixels of one shape at a time.
"""

from __future__ import annotations

import itertools

import numpy as np

from urbanseg.imaging import draw_polygons
from urbanseg.synth.scene import Camera, Scene, Shape


def clip_polygon(poly: np.ndarray, width: int, height: int) -> np.ndarray | None:
    """Clip a (K, 2) float polygon to the image rectangle [0, W-1] x [0, H-1]
    (Sutherland-Hodgman) and round to integer pixels; None if nothing is left."""
    pts = np.asarray(poly, np.float64)
    lo, hi = pts.min(0), pts.max(0)
    if hi[0] < 0 or hi[1] < 0 or lo[0] > width - 1 or lo[1] > height - 1:
        return None
    inside_all = lo[0] >= 0 and lo[1] >= 0 and hi[0] <= width - 1 and hi[1] <= height - 1
    for axis, limit, keep_above in ((0, 0.0, True), (0, width - 1.0, False), (1, 0.0, True), (1, height - 1.0, False)):
        if len(pts) == 0 or inside_all:
            break
        inside = pts[:, axis] >= limit if keep_above else pts[:, axis] <= limit
        out = []
        for i in range(len(pts)):
            a, b = pts[i - 1], pts[i]
            ia, ib = inside[i - 1], inside[i]
            if ia != ib:
                t = (limit - a[axis]) / (b[axis] - a[axis])
                out.append(a + t * (b - a))
            if ib:
                out.append(b)
        pts = np.asarray(out).reshape(-1, 2)
    if len(pts) < 3:
        return None
    pts = np.rint(pts).astype(np.int64)
    keep = np.r_[True, np.any(pts[1:] != pts[:-1], axis=1)]  # drop repeated vertices
    pts = pts[keep]
    if len(pts) > 1 and (pts[0] == pts[-1]).all():
        pts = pts[:-1]
    return pts if len(pts) >= 3 else None


class Noise:
    """Smooth value noise from a few random 64x64 lattices, sampled bilinearly with wrap."""

    def __init__(self, rng: np.random.Generator, tiles: int = 4, size: int = 64):
        self.t = rng.uniform(-1, 1, (tiles, size, size)).astype(np.float32)
        self.n = size

    def __call__(self, u: np.ndarray, v: np.ndarray, scale: float, k: int = 0) -> np.ndarray:
        """(N,) float32 noise in [-1, 1] at (u, v) / scale (metres), lattice `k`."""
        import cv2

        n = self.n
        x = np.asarray(u, np.float32) * np.float32(1 / scale) + np.float32(17.3 * k)
        y = np.asarray(v, np.float32) * np.float32(1 / scale) + np.float32(5.1 * k)
        x -= np.floor(x * np.float32(1 / n)) * n  # remap's fixed-point maps need small coordinates
        y -= np.floor(y * np.float32(1 / n)) * n
        # cv2.remap: bilinear lookup with wrap-around, maps limited to < 32767 per side
        count, cols = len(x), 4096
        rows = max(1, -(-count // cols))
        pad = rows * cols - count
        mx, my = np.pad(x, (0, pad)).reshape(rows, cols), np.pad(y, (0, pad)).reshape(rows, cols)
        out = cv2.remap(self.t[k % len(self.t)], mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
        return out.ravel()[:count]

    def cell(self, i: np.ndarray, j: np.ndarray, k: int = 1) -> np.ndarray:
        """A random value in [-1, 1] per integer cell (a brick, a paving stone)."""
        return self.t[k % len(self.t)][j.astype(np.int64) % self.n, (i.astype(np.int64) * 7) % self.n]

    def fbm(self, u: np.ndarray, v: np.ndarray, scale: float, k: int = 0, octaves: int = 3) -> np.ndarray:
        out, amp = np.zeros(u.shape, np.float32), 1.0
        for o in range(octaves):
            out += amp * self(u, v, scale / 2**o, k + o)
            amp *= 0.5
        return out / 1.75


def surface(
    cam: Camera, plane: tuple, xs: np.ndarray, ys: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Pixel centres (N,) -> surface coordinates (u, v) in metres, depth Z and, for a
    vehicle, which pixels lie on its side face (else None); all (N,) arrays."""
    x, y = xs + 0.5, ys + 0.5
    kind = plane[0]
    if kind == "ground":
        Z = cam.f * cam.cam_h / np.maximum(y - cam.yh, 0.5)
        return (x - cam.xv) * Z / cam.f, Z, Z, None
    if kind == "side":
        dx = x - cam.xv
        dx = np.where(np.abs(dx) < 0.5, np.copysign(0.5, plane[1]), dx)
        Z = np.clip(cam.f * plane[1] / dx, 0.3, 1e4)
        return Z, cam.cam_h - (y - cam.yh) * Z / cam.f, Z, None
    if kind == "front":
        Z = plane[1]
        u = (x - cam.xv) * Z / cam.f - plane[2]
        v = cam.cam_h - (y - cam.yh) * Z / cam.f - plane[3]
        return u, v, np.full(x.shape, Z), None
    if kind == "box":  # a vehicle: its rear face, or the side face we look at
        Zr, x0, x1, L = plane[1:]
        X = (x - cam.xv) * Zr / cam.f
        Xs = np.where(x1 < X, x1, x0)
        on_side = (x1 < X) | (x0 > X)
        dx = x - cam.xv
        dx = np.where(np.abs(dx) < 0.5, 0.5, dx)
        Zs = np.clip(cam.f * Xs / dx, Zr, Zr + L)
        Z = np.where(on_side, Zs, Zr)
        u = np.where(on_side, Zs - Zr, X - (x0 + x1) / 2)  # side: metres from the rear
        return u, cam.cam_h - (y - cam.yh) * Z / cam.f, Z, on_side
    if kind == "sky":
        return (x - cam.xv) / cam.f, (cam.yh - y) / cam.f, np.full(x.shape, np.inf), None
    # "screen": image coordinates scaled to the object's size
    return (x - plane[1]) / plane[3], (plane[2] - y) / plane[3], np.zeros(x.shape), None


# --------------------------------------------------------------------------- textures
# Each texture gets the pixels of one shape as SurfacePixels and returns (N, 3) float32 RGB in 0..1.
# Fine patterns fade with the pixel footprint `mpp` (metres per pixel) instead of aliasing.


class SurfacePixels:
    """The pixels of one shape, as a texture sees them: `tex_x`, `tex_y` are the surface
    coordinates in metres (on the ground: across and along the street; on a facade: along
    the street and height), `depth` the distance from the camera, `on_side` which pixels
    lie on a vehicle's side face (else None), `mpp` metres per pixel; `noise` the scene's
    value noise and `params` the shape's texture parameters."""

    def __init__(
        self,
        tex_x: np.ndarray,
        tex_y: np.ndarray,
        depth: np.ndarray,
        on_side: np.ndarray | None,
        mpp: np.ndarray,
        noise: Noise,
        params: dict,
    ) -> None:
        self.tex_x, self.tex_y, self.depth, self.on_side, self.mpp = tex_x, tex_y, depth, on_side, mpp
        self.noise, self.params = noise, params

    def color(self, key: str = "color") -> np.ndarray:
        return np.asarray(self.params[key], np.float32)

    def fade(self, feature: float) -> np.ndarray:
        """1 where a pattern of `feature` metres spans several pixels, 0 where it is sub-pixel."""
        return np.clip(feature / (3 * self.mpp) - 0.3, 0, 1).astype(np.float32)


def _mix(a, b, t) -> np.ndarray:
    t = np.asarray(t, np.float32)[..., None]
    return np.asarray(a, np.float32) * (1 - t) + np.asarray(b, np.float32) * t


def _scale(rgb, s) -> np.ndarray:
    return np.asarray(rgb, np.float32) * np.asarray(s, np.float32)[..., None]


def _band(x: np.ndarray, centre, half: float, mpp: np.ndarray) -> np.ndarray:
    """Coverage (0..1) of a line of half-width `half` around `centre`, anti-aliased."""
    w = np.maximum(half, mpp / 2)
    return np.clip((w - np.abs(x - centre)) / np.maximum(mpp, 1e-6) + 0.5, 0, 1) * np.minimum(1, half / w)


def tex_sky(px: SurfacePixels) -> np.ndarray:
    t = np.clip(px.tex_y * 2.8, 0, 1)
    base = _mix(px.params["color2"], px.params["color"], t)
    cloud = np.clip(px.noise.fbm(px.tex_x * 3, px.tex_y * 8, 1.0, 0) * 2 + px.params["clouds"] - 0.5, 0, 1)
    return _mix(base, [0.9, 0.9, 0.92], cloud * 0.85)


def tex_asphalt(px: SurfacePixels) -> np.ndarray:
    X, Z, p = px.tex_x, px.tex_y, px.params
    s = 1 + 0.1 * px.noise.fbm(X, Z, 2.0, 0) + 0.08 * px.noise(X, Z, 0.08, 1) * px.fade(0.08)
    s = s * np.where(px.noise(X, Z, 4.0, 2) > 0.55, 0.8, 1.0)  # patched repairs
    rgb = _scale(px.color(), s)
    dash = (Z % (2 * p["dash"])) < p["dash"]
    mark = np.zeros(X.shape, np.float32)
    lanes = p["lanes"]
    for a, b in itertools.pairwise(lanes):
        mark = np.maximum(mark, _band(X, (a + b) / 2, 0.06, px.mpp) * dash)
    for e, inward in zip(p["edges"], (0.3, -0.3), strict=True):
        mark = np.maximum(mark, _band(X, e + inward, 0.06, px.mpp))
    if p["crossing"] is not None:
        zebra = (p["crossing"] < Z) & (p["crossing"] + 3.5 > Z) & ((X % 1.0) < 0.5)
        mark = np.maximum(mark, zebra.astype(np.float32))
    mark *= px.noise(X, Z, 0.3, 3) > -0.6  # worn paint
    return _mix(rgb, _scale(p["marks"], 0.9 + 0.1 * px.noise(X, Z, 0.5, 1)), mark)


def tex_pavers(px: SurfacePixels) -> np.ndarray:
    t = px.params["tile"]
    gx, gz = px.tex_x / t, px.tex_y / (t * 1.5)
    gx = gx + 0.5 * (np.floor(gz) % 2)  # running bond
    joint = ((gx % 1) < 0.06) | ((gz % 1) < 0.06)
    s = (
        1
        + 0.12 * px.noise.cell(np.floor(gx), np.floor(gz)) * px.fade(t)
        + 0.1 * px.noise.fbm(px.tex_x, px.tex_y, 3.0, 2)
    )
    s = s * (1 - 0.35 * joint * px.fade(0.03 * t / 0.06))
    return _scale(px.color(), s)


def tex_kerb(px: SurfacePixels) -> np.ndarray:
    joint = (px.tex_x % 1.0 < 0.02) | (px.tex_y % 1.0 < 0.02)
    s = 1 + 0.06 * px.noise(px.tex_x, px.tex_y, 0.2, 1) - 0.3 * joint * px.fade(0.02)
    return _scale(px.color(), s)


def tex_grass(px: SurfacePixels) -> np.ndarray:
    blades = px.noise(px.tex_x * 4, px.tex_y, 0.05, 1) * px.fade(0.05)
    s = 0.85 + 0.25 * px.noise.fbm(px.tex_x, px.tex_y, 1.5, 0) + 0.15 * blades
    soil = np.clip(px.noise(px.tex_x, px.tex_y, 2.5, 3) * 3 - 1.5, 0, 1) * 0.6
    return _mix(_scale(px.color(), s), [0.42, 0.34, 0.26], soil)


def tex_facade(px: SurfacePixels) -> np.ndarray:
    u, v, p = px.tex_x, px.tex_y, px.params
    if p["bricks"]:
        row = np.floor(v / 0.075)
        col = np.floor(u / 0.25 + 0.5 * (row % 2))
        mortar = ((v % 0.075) < 0.012) | (((u / 0.25 + 0.5 * (row % 2)) % 1) < 0.05)
        s = 1 + 0.12 * px.noise.cell(col, row) * px.fade(0.07) - 0.3 * mortar * px.fade(0.012)
    else:
        s = 1 + p["rough"] * px.noise.fbm(u, v, 1.0, 1)
    s = s * np.where(v < 0.6, 0.8, 1.0)  # darker plinth
    rgb = _scale(px.color(), s)
    fy, fx = (v - p["floor"]) / p["floor"], u / p["bay"]
    window = (v > p["floor"]) & ((fy % 1) > 0.3) & ((fy % 1) < 0.8) & (np.abs(fx % 1 - 0.5) < p["win"] / 2)
    if p["shop"]:
        window |= (v > 0.5) & (v < p["floor"] - 0.5) & (np.abs((u / (2 * p["bay"])) % 1 - 0.5) < 0.4)
    glass = _scale(px.color("color2"), 0.35 + 0.35 * (px.noise.fbm(u, v, 2.0, 3) + 1) / 2)
    rgb = np.where(window[:, None], glass, rgb)
    if "top" in p:
        roof = v > p["top"]
        rgb[roof] = _scale(px.color("roof"), 1 + 0.15 * px.noise(u[roof], v[roof], 0.3, 2))
    return rgb


def tex_wall(px: SurfacePixels) -> np.ndarray:
    s = 1 + 0.12 * px.noise.fbm(px.tex_x, px.tex_y, 0.8, 0) - 0.35 * ((px.tex_x % 2.5) < 0.03) * px.fade(0.03)
    graffiti = (px.noise.fbm(px.tex_x, px.tex_y, 0.7, 2) > 0.55 - px.params["amount"]) & (px.tex_y < 1.8)
    return np.where(graffiti[:, None], px.color("graffiti")[None], _scale(px.color(), s))


def tex_fence(px: SurfacePixels) -> np.ndarray:
    slat = (px.tex_x / px.params["slat"]) % 1 < 0.55
    rail = (np.abs(px.tex_y - 0.25) < 0.05) | (np.abs(px.tex_y - 0.9) < 0.05)
    gap = _scale(px.color("color2"), 0.5 + 0.2 * px.noise(px.tex_x, px.tex_y, 0.5, 1))
    solid = _scale(px.color(), 1 + 0.1 * px.noise(px.tex_x, px.tex_y, 0.3, 2))
    see = px.fade(px.params["slat"] * 0.45)  # far away the slats blend with what is behind
    t = np.where(slat | rail, 0.0, 1.0) * see + 0.45 * (1 - see)
    return _mix(solid, gap, t)


def tex_foliage(px: SurfacePixels) -> np.ndarray:
    leaves = px.noise(px.tex_x, px.tex_y, 0.12, 1) * px.fade(0.12)
    clumps = px.noise.fbm(px.tex_x, px.tex_y, 0.8, 2)
    s = 0.75 + 0.35 * clumps + 0.25 * leaves
    s = s * np.where(clumps + 0.5 * leaves < -0.55, 0.35, 1.0)  # holes of deep shade
    return _scale(_mix(px.color(), px.color("color2"), (px.noise(px.tex_x, px.tex_y, 2.0, 3) + 1) / 2), s)


def tex_bark(px: SurfacePixels) -> np.ndarray:
    return _scale(px.color(), 0.8 + 0.25 * px.noise(px.tex_x * 8, px.tex_y, 0.4, 1))


def tex_paint(px: SurfacePixels) -> np.ndarray:
    return _scale(px.color(), 1 + 0.08 * px.noise.fbm(px.tex_x, px.tex_y, 0.3, 1) + 0.06 * np.tanh(px.tex_y))


def tex_sign(px: SurfacePixels) -> np.ndarray:
    r = np.hypot(px.tex_x, px.tex_y)
    rgb = _scale(px.color(), 1 + 0.05 * px.noise(px.tex_x, px.tex_y, 0.1, 1))
    border = r > 0.75 * px.params["r"]
    symbol = (np.abs(px.tex_y) < 0.08 * px.params["r"] / 0.4) & (np.abs(px.tex_x) < 0.5 * px.params["r"])
    return np.where((border | symbol)[:, None], px.color("color2")[None], rgb)


def tex_light(px: SurfacePixels) -> np.ndarray:
    rgb = _scale(px.color(), 1 + 0.05 * px.noise(px.tex_x, px.tex_y, 0.1, 1))
    lamps = ([0.9, 0.1, 0.05], [0.95, 0.7, 0.1], [0.1, 0.9, 0.4])
    for k, centre in enumerate((0.83, 0.5, 0.17)):
        on = np.hypot(px.tex_x, px.tex_y - centre) < 0.12
        lamp = lamps[2 - k] if k == 2 - px.params["lit"] else [0.12, 0.12, 0.12]
        rgb[on] = lamp
    return rgb


def tex_vehicle(px: SurfacePixels) -> np.ndarray:
    p, u, v = px.params, px.tex_x, px.tex_y
    w, h, L = p["w"], p["h"], p["L"]
    # the side-face mask is always given for a vehicle ("box" plane)
    side = px.on_side if px.on_side is not None else np.zeros(u.shape, bool)
    body = _scale(px.color(), 0.75 + 0.3 * np.clip(v / h, 0, 1) + 0.05 * px.noise(u, v, 0.3, 1))
    glass = _scale(px.color("glass"), 1 + 0.3 * px.noise.fbm(u, v, 1.0, 2))
    if p["kind"] == "car":
        win_rear = ~side & (v > 0.62 * h) & (v < 0.95 * h) & (np.abs(u) < 0.36 * w)
        win_side = side & (v > 0.62 * h) & (v < 0.93 * h) & (u > 0.28 * L) & (u < 0.74 * L)
    elif p["kind"] == "bus":
        win_rear = ~side & (v > 0.7 * h) & (v < 0.92 * h) & (np.abs(u) < 0.42 * w)
        win_side = side & (v > 1.2) & (v < h - 0.3) & (u > 0.3) & (u < L - 0.3) & ((u % 1.4) > 0.1)
    else:
        win_rear = np.zeros(u.shape, bool)
        win_side = side & (v > 1.6) & (v < h - 0.5) & (u > L - 1.6)
    rgb = np.where((win_rear | win_side)[:, None], glass, body)
    lights = ~side & (v > 0.52 * min(h, 1.5)) & (v < 0.62 * min(h, 1.5)) & (np.abs(u) > w / 2 - 0.3)
    rgb[lights] = [0.65, 0.05, 0.04]
    tyre_rear = ~side & (v < 0.3) & (np.abs(u) > w / 2 - 0.3)
    wheel = side & ((np.hypot(u - 0.8, v - 0.33) < 0.33) | (np.hypot(u - (L - 0.9), v - 0.33) < 0.33))
    rgb[tyre_rear | wheel] = [0.05, 0.05, 0.05]
    rgb[~side & (v < 0.3) & ~tyre_rear] *= 0.55  # bumper and the shade under the car
    return rgb


def tex_bike(px: SurfacePixels) -> np.ndarray:
    rgb = _scale(px.color(), 1 + 0.1 * px.noise(px.tex_x, px.tex_y, 0.2, 1))
    rgb[px.tex_y < 0.45] = _scale(
        [0.06, 0.06, 0.06], 1 + 0.2 * px.noise(px.tex_x[px.tex_y < 0.45], px.tex_y[px.tex_y < 0.45], 0.1, 2)
    )
    return rgb


def tex_person(px: SurfacePixels) -> np.ndarray:
    p = px.params
    t = (px.tex_y + p["offset"]) / p["height"]
    rgb = np.where((t < 0.46)[:, None], px.color("color2")[None], px.color()[None])
    rgb = np.where((t > 0.84)[:, None], px.color("skin")[None], rgb)
    rgb = np.where((t > 0.93)[:, None], px.color("hair")[None], rgb)
    return _scale(rgb, 0.85 + 0.15 * px.noise(px.tex_x, px.tex_y, 0.15, 1) + 0.1 * np.clip(t, 0, 1))


def tex_ego(px: SurfacePixels) -> np.ndarray:
    s = 0.45 + 0.5 * np.clip(1 + px.tex_y, 0, 1) + 0.05 * px.noise(px.tex_x, px.tex_y, 0.2, 1)
    shine = np.clip(1 - np.abs(px.tex_y + 0.15) * 8, 0, 1) * 0.3  # reflection of the sky
    return _mix(_scale(px.color(), s), [0.85, 0.88, 0.9], shine)


TEXTURES = {
    "sky": tex_sky,
    "asphalt": tex_asphalt,
    "pavers": tex_pavers,
    "kerb": tex_kerb,
    "grass": tex_grass,
    "facade": tex_facade,
    "wall": tex_wall,
    "fence": tex_fence,
    "foliage": tex_foliage,
    "bark": tex_bark,
    "paint": tex_paint,
    "sign": tex_sign,
    "light": tex_light,
    "vehicle": tex_vehicle,
    "bike": tex_bike,
    "person": tex_person,
    "ego": tex_ego,
}


# --------------------------------------------------------------------------- photo


def render(scene: Scene, shapes: list[Shape], polygons: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Paint the photo: (H, W, 3) uint8. `polygons` are the clipped integer polygons of
    `shapes` (same order); each pixel takes the texture of the last shape drawn over it."""
    cam, light = scene.camera, scene.light
    W, H = cam.width, cam.height
    owner = draw_polygons((W, H), polygons, range(1, len(polygons) + 1), "I")
    img = np.zeros((H, W, 3), np.float32)
    ground = np.zeros((H, W), bool)
    noise = Noise(rng)
    haze = np.asarray(shapes[0].params.get("color2", (0.8, 0.8, 0.8)), np.float32)
    for k, (shape, poly) in enumerate(zip(shapes, polygons, strict=True), start=1):
        (x0, y0), (x1, y1) = poly.min(0), poly.max(0) + 1
        ys, xs = np.nonzero(owner[y0:y1, x0:x1] == k)
        if len(ys) == 0:
            continue
        ys, xs = ys + y0, xs + x0
        u, v, z, face = surface(cam, shape.plane, xs, ys)
        px = SurfacePixels(u, v, z, face, np.maximum(z, 0) / cam.f, noise, shape.params)
        rgb = TEXTURES[shape.tex](px)
        if shape.plane[0] not in ("sky", "screen"):  # aerial perspective: far things fade into the haze
            rgb = _mix(rgb, haze, 1 - np.exp(-z / light["fog"]))
        img[ys, xs] = rgb
        if shape.plane[0] == "ground":
            ground[ys, xs] = True
    return _camera_effects(img, scene, ground, rng)


def _camera_effects(img: np.ndarray, scene: Scene, ground: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sun and shadows, exposure, white balance, vignetting, lens blur and sensor noise."""
    import cv2

    light, (H, W) = scene.light, img.shape[:2]
    if light["sunny"]:
        polys = [p for p in (clip_polygon(s, W, H) for s in scene.shadows) if p is not None]
        shade = draw_polygons((W, H), polys, [1] * len(polys), "L").astype(np.float32) * ground
        shade = cv2.GaussianBlur(shade, (0, 0), max(0.5, 2.0 * W / 2048))
        for ch, depth in enumerate((0.6, 0.56, 0.48)):  # sunlit 1.15, bluish shade
            img[..., ch] *= 1.15 - depth * shade
    img *= np.asarray(light["white"], np.float32) * light["exposure"]
    xx = ((np.arange(W, dtype=np.float32) - W / 2) / (W / 2)) ** 2
    yy = ((np.arange(H, dtype=np.float32) - H / 2) / (H / 2)) ** 2
    img *= (1 - light["vignette"] / 2 * (yy[:, None] + xx[None, :]))[..., None]
    img = np.asarray(cv2.GaussianBlur(img, (0, 0), light["blur"]), np.float32)  # (typed: no copy)
    img += rng.standard_normal((H, W, 1), dtype=np.float32) * light["noise"]  # luminance noise
    img *= 255
    img += 0.5
    np.clip(img, 0, 255, out=img)
    out = img.astype(np.uint8)
    gamma = ((np.arange(256) / 255.0) ** light["gamma"] * 255 + 0.5).astype(np.uint8)
    return cv2.LUT(out, gamma)
