"""Render first-person driving clips with exact 2D boxes in MetaDrive 0.3.0.1 (headless, CPU).

This file runs as a plain script inside the simulator's own virtual environment (`scripts/setup_sim.sh`), which has
metadrive, panda3d and numpy but none of drivesim's dependencies, so it imports only those and the standard
library. `drivesim.datasets.simulate` starts it as worker subprocesses and converts its raw output into the clip
format.

Usage (one worker)::

    .venv-sim/bin/python datasets/metadrive_gen.py --out STAGING --frames 32 --width 256 --height 128 \
        --jobs '[{"id": "clip_0000", "seed": 3, "night": 1}]'

For every job it writes `STAGING/<id>.npy` (uint8 RGB frames (t, h, w, 3)) and then `STAGING/<id>.raw.json`
(written last: it marks the clip complete) with fps, width, height, night, crowdedness, source, and per frame a
list of boxes `{track_id, class, x1, y1, x2, y2}` in pixels of the rendered image (x right, y down, xyxy, clipped
to [0, width] x [0, height]). One line of JSON per finished clip goes to stdout.

What the scene is: a procedurally generated MetaDrive road map (its seed = the job's seed; `--map` blocks), traffic
seeded by the same seed, the ego car driven by MetaDrive's IDM policy, a roof camera (60 degree horizontal field of
view). One simulator step is 0.1 s, so clips are 10 fps. `--warmup` steps are simulated before recording so the ego
car is already moving. An episode that ends inside the clip (crash, leaving the road, arriving at the destination)
is rendered again on the next map seed (`seed + 1_000_003 * attempt`); the seed actually used is in `source`.

Boxes: for each other vehicle, the 8 corners of its model's tight bounds in its own frame are moved into the camera
frame; the box's 12 edges are clipped to the camera's near plane (so a car beside the camera, partly behind it,
still gets the box of its visible part); the remaining points are projected with the camera lens and the min/max
taken, then clipped to the image. Dropped: vehicles whose centre is more than `MAX_DISTANCE_M` from the camera,
boxes under `MIN_BOX_PX` wide or high after clipping, and boxes lying entirely inside the box of a nearer vehicle
(hidden behind it; partly occluded vehicles keep their full, amodal box). The track id is the vehicle's MetaDrive
object id, renumbered 0, 1, ... in order of first appearance in the clip. `crowdedness` is the number of distinct
vehicles that have a box in at least one frame of the clip.

Night: MetaDrive 0.3.0.1 has no time of day, so night is made by dimming the world's directional and ambient light,
setting the camera buffers' clear colour (the sky) to a dark blue, a spotlight parented to the ego car as headlights
(it lights the vehicles ahead), a light pool on the road ahead (see `_light_pool`), and small unlit red tail lamps
and white head lamps on every other vehicle, so that labelled vehicles stay visible in the dark.

Speed on a CPU (Mesa llvmpipe; facts in `shared/notes/metadrive.md` plus one found here): the ground plane's
texture (a 20 km card, texture repeated 2000 times) is sampled with 8x anisotropic filtering, which llvmpipe
executes so slowly that single frames took 30-300 s whenever much ground was in view; trilinear filtering
(anisotropic degree 1) renders the same frame in well under 0.1 s. Also: no skybox, no multisampling, the ego's own
256k-triangle model hidden from the roof camera, traffic drawn from the light vehicle models only, the 1x1 main
window's scene pass switched off, one llvmpipe thread per process.

One module because it runs as a script inside the simulator's own environment (numpy 1.24, gym 0.25), where the
rest of drivesim is not importable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("LP_NUM_THREADS", "1")  # llvmpipe threads: one per worker process renders fastest here

FPS = 10.0
MAX_DISTANCE_M = 120.0
MIN_BOX_PX = 2.0
RETRY_SEED_STRIDE = 1_000_003
MAX_ATTEMPTS = 5
# Traffic model mix for MetaDrive's vehicle types (s, m, l, xl, default, static_default). "default" (the ego's
# model, 256k triangles) is left out and "l" (94k) kept rare: triangles are what software rendering pays for;
# s/m/xl have 10k-40k.
TRAFFIC_TYPE_P = (0.35, 0.3, 0.1, 0.25, 0.0, 0.0)
# MetaDrive vehicle class -> drivesim class (bbox_conditioning/classes.py), from looking at the models:
# s = beetle, m = saloon ("130"), default = sports car ("ferra"), l = lada (a small boxy car) -> "car";
# xl = box truck -> "truck". No MetaDrive 0.3.0.1 model is a van.
CLASS_OF_TYPE = {"SVehicle": "car", "MVehicle": "car", "LVehicle": "car", "DefaultVehicle": "car",
                 "StaticDefaultVehicle": "car", "XLVehicle": "truck"}
# light values are linear; the PBR pipeline's tone mapping gamma-encodes them (0.03 -> ~48/255)
NIGHT_DIRECTIONAL = (0.03, 0.03, 0.05)
NIGHT_AMBIENT = (0.01, 0.01, 0.02)
NIGHT_SKY = (0.004, 0.005, 0.012)
HEADLIGHT = (6.0, 6.0, 5.0)
TAIL_LAMP = (1.0, 0.08, 0.04)
HEAD_LAMP = (1.0, 0.95, 0.8)
POOL_GAIN = 18.0  # the headlight pool multiplies the night-lit ground by up to 1 + POOL_GAIN
POOL_RANGE_M = (1.5, 40.0)
POOL_HALF_WIDTH_M = 10.0
POOL_HEIGHT_M = 0.03
DAY_AMBIENT = (0.18, 0.2, 0.2)  # MetaDrive's own values (engine/core/light.py)
# 12 edges of a box whose corners are indexed by the bits (x, y, z) of 0..7
BOX_EDGES = tuple((a, a | bit) for a in range(8) for bit in (1, 2, 4) if not a & bit)


def _patch_metadrive():
    """Renderer settings that must be in place before MetaDrive builds its engine."""
    # engine_core's class body sets "multisamples 8" when imported: import it first, then override
    import metadrive.engine.core.engine_core  # noqa: F401
    import metadrive.engine.core.our_pbr as our_pbr
    import metadrive.engine.core.terrain as terrain
    from metadrive.component.vehicle.vehicle_type import random_vehicle_type
    from metadrive.manager.map_manager import PGMapManager
    from metadrive.manager.traffic_manager import PGTrafficManager
    from panda3d.core import loadPrcFileData

    loadPrcFileData("", "framebuffer-multisample 0\nmultisamples 0\naudio-library-name null\n")

    pbr_init = our_pbr.OurPipeline.__init__

    def pbr_init_without_msaa(self, *args, **kwargs):
        kwargs["msaa_samples"] = 0  # the software rasteriser cannot create multisampled buffers
        pbr_init(self, *args, **kwargs)

    our_pbr.OurPipeline.__init__ = pbr_init_without_msaa

    terrain_init = terrain.Terrain.__init__

    def terrain_init_trilinear(self, *args, **kwargs):
        terrain_init(self, *args, **kwargs)
        if getattr(self, "terrain_texture", None) is not None:
            self.terrain_texture.setAnisotropicDegree(1)  # see the module docstring: 8x stalls llvmpipe

    terrain.Terrain.__init__ = terrain_init_trilinear

    PGTrafficManager.random_vehicle_type = lambda self: random_vehicle_type(self.np_random, list(TRAFFIC_TYPE_P))

    map_manager_init = PGMapManager.__init__

    def map_manager_any_seed(self):
        # MetaDrive pre-allocates one slot per seed in [start_seed, start_seed + environment_num); here a clip's
        # seed is any integer
        map_manager_init(self)
        self.maps = _OneMap()

    PGMapManager.__init__ = map_manager_any_seed


class _OneMap(dict):
    def __missing__(self, seed):
        return None


class Renderer:
    """One MetaDrive environment that renders clips on a sequence of map seeds."""

    def __init__(self, width: int, height: int, traffic_density: float, map_blocks: str):
        _patch_metadrive()
        from metadrive.envs.metadrive_env import MetaDriveEnv
        from metadrive.policy.idm_policy import IDMPolicy

        self.width, self.height = width, height
        self.map_blocks = map_blocks
        self.env = MetaDriveEnv(dict(
            use_render=False, image_observation=True, rgb_clip=False,
            vehicle_config=dict(image_source="rgb_camera", rgb_camera=(width, height), stack_size=1),
            global_light=False, show_skybox=False, show_logo=False, show_fps=False, show_interface=False,
            multi_thread_render=False, disable_model_compression=True,
            agent_policy=IDMPolicy, traffic_density=traffic_density,
            start_seed=0, environment_num=1, map=_map_config(map_blocks),
            crash_vehicle_done=True, out_of_route_done=True, horizon=None,
        ))
        self._headlights = None
        self._pool = None
        self._bounds: dict[str, object] = {}  # vehicle id -> (8, 4) homogeneous corners in its own frame
        self._lamped: set[str] = set()

    # -- scene setup -------------------------------------------------------------------------------------------

    def _camera(self):
        sensor = self.env.vehicle.image_sensors["rgb_camera"]
        # the RGB camera is a per-process singleton; per-vehicle instances created after the first hold no buffer
        return type(sensor)._singleton

    def _speed_up(self):
        from metadrive.constants import CamMask

        engine, ego = self.env.engine, self.env.vehicle
        # the roof camera cannot see the ego model, but drawing it costs its 256k triangles every frame
        ego.origin.hide(CamMask.RgbCam)
        # the 1x1 main window re-renders the whole scene for a chase camera nobody looks at
        for window in engine.graphicsEngine.getWindows():
            if window.getXSize() == 1 and window.getYSize() == 1:
                window.setActive(False)

    def _set_lighting(self, night: bool):
        from panda3d.core import LVector4, Spotlight, Vec4

        engine, ego = self.env.engine, self.env.vehicle
        light = engine.world_light
        camera = self._camera()
        if night:
            light.direction_np.node().setColor(LVector4(*NIGHT_DIRECTIONAL, 1))
            light.ambient_np.node().setColor(LVector4(*NIGHT_AMBIENT, 1))
            sky = Vec4(*NIGHT_SKY, 1)
        else:  # MetaDrive's own defaults
            light.direction_np.node().setColor(LVector4(1, 1, 1, 1))
            light.direction_np.node().setColorTemperature(6800)
            light.ambient_np.node().setColor(LVector4(*DAY_AMBIENT, 1))
            bkg = tuple(camera.BKG_COLOR)
            sky = Vec4(*bkg) if len(bkg) == 4 else Vec4(*bkg, 1)
        # the PBR filter manager renders the scene into its own buffers: their clear colour is the sky
        buffers = [camera.buffer] + list(getattr(getattr(camera, "manager", None), "buffers", []) or [])
        for buffer in buffers:
            buffer.setClearColor(sky)
            for i in range(buffer.getNumDisplayRegions()):
                buffer.getDisplayRegion(i).setClearColor(sky)
        if self._headlights is not None:
            engine.pbr_render.clearLight(self._headlights)
            self._headlights.removeNode()
            self._headlights = None
        if self._pool is not None:
            self._pool.removeNode()
            self._pool = None
        if night:
            # Headlights. The spotlight lights the vehicles (per-pixel PBR shading) only: the road is shaded per
            # vertex on long quads, where a spotlight gives a patch that brightens as the car nears a vertex.
            # The road gets a fixed light pool instead: an additive, unlit card on the ground ahead of the car.
            spot = Spotlight("headlights")
            spot.setColor(LVector4(*HEADLIGHT, 1))
            spot.getLens().setFov(80, 40)
            spot.setExponent(0.6)
            spot.setAttenuation((1.0, 0.0, 0.004))
            self._headlights = ego.origin.attachNewNode(spot)
            self._headlights.setPos(0, 2.2, 0.7)
            self._headlights.setHpr(0, -4, 0)
            engine.pbr_render.setLight(self._headlights)
            self._pool = _light_pool(engine.render)
            if not engine.taskMgr.hasTaskNamed("drivesim_light_pool"):
                # after the physics step, before the frame is drawn (Panda3D's render task has sort 50)
                engine.taskMgr.add(self._follow_ego, "drivesim_light_pool", sort=40)

    def _follow_ego(self, task=None):
        if self._pool is not None:
            origin, render = self.env.vehicle.origin, self.env.engine.render
            pos = origin.getPos(render)
            self._pool.setPos(pos.x, pos.y, POOL_HEIGHT_M)
            self._pool.setH(origin.getH(render))
        return task.cont if task is not None else None

    def _add_lamps(self):
        """Night: unlit tail and head lamps on every traffic vehicle (cards just outside its bounds)."""
        from panda3d.core import CardMaker

        for vehicle in self.env.engine.traffic_manager.spawned_objects.values():
            if vehicle is self.env.vehicle or vehicle.id in self._lamped or not hasattr(vehicle, "origin"):
                continue
            corners = self._corners(vehicle)  # bounds first: the lamps must not enlarge them
            (x0, y0, z0), (x1, y1, z1) = corners[0, :3], corners[7, :3]
            half, size = 0.5 * (x1 - x0), 0.11 * (x1 - x0)
            for y, colour, z_frac in ((y0 - 0.02, TAIL_LAMP, 0.45), (y1 + 0.02, HEAD_LAMP, 0.3)):
                for side in (-1, 1):
                    maker = CardMaker("lamp")
                    maker.setFrame(-size, size, -0.5 * size, 0.5 * size)
                    lamp = vehicle.origin.attachNewNode(maker.generate())
                    lamp.setPos(0.5 * (x0 + x1) + side * 0.72 * half, y, z0 + z_frac * (z1 - z0))
                    lamp.setTwoSided(True)
                    lamp.setShaderOff(10)  # flat emissive colour, not the PBR shader's lit surface
                    lamp.setLightOff(10)
                    lamp.setColor(*colour, 1)
            self._lamped.add(vehicle.id)

    # -- boxes -------------------------------------------------------------------------------------------------

    def _corners(self, vehicle):
        import numpy as np

        corners = self._bounds.get(vehicle.id)
        if corners is None:
            lo, hi = vehicle.origin.getTightBounds(vehicle.origin)
            corners = np.array([[(hi if i & 1 else lo).x, (hi if i & 2 else lo).y, (hi if i & 4 else lo).z, 1.0]
                                for i in range(8)])
            self._bounds[vehicle.id] = corners
        return corners

    def boxes(self) -> list[dict]:
        """2D boxes of the other vehicles in view, nearest first.

        Returns:
            list of {"object_id", "class", "x1", "y1", "x2", "y2", "depth"}: pixels of the rendered image (x right,
            y down), clipped to the image; depth is the camera-frame distance (m) of the vehicle's centre.
        """
        import numpy as np

        engine, ego = self.env.engine, self.env.vehicle
        camera = self._camera()
        cam, lens = camera.cam, camera.lens
        near = max(float(lens.getNear()), 0.05)
        projection = _mat(lens.getProjectionMat())
        out = []
        for vehicle in engine.traffic_manager.spawned_objects.values():
            if vehicle is ego or not hasattr(vehicle, "origin"):
                continue
            # Panda3D matrices act on row vectors: p_cam = p_obj @ M; camera frame x right, y forward, z up
            to_cam = _mat(vehicle.origin.getMat(cam))
            pts = self._corners(vehicle) @ to_cam
            centre = pts[:, :3].mean(axis=0)
            if np.linalg.norm(centre) > MAX_DISTANCE_M or pts[:, 1].max() <= near:
                continue
            front = [p for p in pts if p[1] > near]
            for a, b in BOX_EDGES:  # edges crossing the near plane contribute their crossing point
                pa, pb = pts[a], pts[b]
                if (pa[1] > near) != (pb[1] > near):
                    s = (near - pa[1]) / (pb[1] - pa[1])
                    front.append(pa + s * (pb - pa))
            clip = np.asarray(front) @ projection
            film = clip[:, :2] / clip[:, 3:4]
            xs = (film[:, 0] + 1.0) * 0.5 * self.width
            ys = (1.0 - film[:, 1]) * 0.5 * self.height
            x1, y1 = max(float(xs.min()), 0.0), max(float(ys.min()), 0.0)
            x2, y2 = min(float(xs.max()), float(self.width)), min(float(ys.max()), float(self.height))
            if x2 - x1 < MIN_BOX_PX or y2 - y1 < MIN_BOX_PX:
                continue
            out.append({"object_id": vehicle.id, "class": CLASS_OF_TYPE.get(type(vehicle).__name__, "car"),
                        "x1": round(x1, 2), "y1": round(y1, 2), "x2": round(x2, 2), "y2": round(y2, 2),
                        "depth": float(centre[1])})
        out.sort(key=lambda b: b["depth"])
        return drop_hidden(out)

    # -- clips -------------------------------------------------------------------------------------------------

    def render_clip(self, seed: int, night: bool, frames: int, warmup: int):
        """Render one clip.

        Returns:
            (images (frames, h, w, 3) uint8 RGB, boxes per frame (lists of box dicts), map seed used, attempts).
        """
        import numpy as np

        for attempt in range(MAX_ATTEMPTS):
            map_seed = seed + RETRY_SEED_STRIDE * attempt
            self.env.reset(force_seed=map_seed)
            self._bounds.clear()
            self._lamped.clear()
            self._speed_up()
            self._set_lighting(night)
            images, boxes_per_frame, done = [], [], False
            for step in range(warmup + frames):
                if night:
                    self._add_lamps()
                obs, _, done, _ = self.env.step([0.0, 0.0])
                if done:
                    break
                if step >= warmup:
                    images.append(obs["image"][..., -1][..., ::-1].copy())  # BGR -> RGB
                    boxes_per_frame.append(self.boxes())
            if not done:
                return np.stack(images).astype(np.uint8), boxes_per_frame, map_seed, attempt + 1
        raise RuntimeError(f"seed {seed}: the episode ended early in {MAX_ATTEMPTS} maps in a row")

    def close(self):
        self.env.close()


_POOL_VERTEX = """#version 120
uniform mat4 p3d_ModelViewProjectionMatrix;
attribute vec4 p3d_Vertex;
attribute vec2 p3d_MultiTexCoord0;
varying vec2 uv;
void main() { gl_Position = p3d_ModelViewProjectionMatrix * p3d_Vertex; uv = p3d_MultiTexCoord0; }
"""
_POOL_FRAGMENT = """#version 120
uniform sampler2D p3d_Texture0;
uniform float gain;
varying vec2 uv;
void main() { gl_FragColor = vec4(gain * texture2D(p3d_Texture0, uv).a * vec3(1.0, 0.95, 0.8), 1.0); }
"""


def _light_pool(parent):
    """The headlights' light on the road: a card on the ground `POOL_RANGE_M` ahead of its origin.

    It multiplies what is already drawn below it by (1 + POOL_GAIN * falloff) (blend: src * dst + dst, into the
    PBR pipeline's float scene buffer, before tone mapping), so road, lane marks and grass keep their contrast.
    Vehicles in front of it are not affected (depth test); the spotlight lights them.
    """
    import numpy as np
    from panda3d.core import CardMaker, ColorBlendAttrib, Shader, Texture

    n = 64
    u, v = np.meshgrid(np.linspace(-1, 1, n), np.linspace(0, 1, n))  # rows: distance ahead, cols: across
    near, far = POOL_RANGE_M
    dist = near + v * (far - near)
    across = np.abs(u) * POOL_HALF_WIDTH_M
    along = np.clip((dist - near) / 3.0, 0, 1) / (1.0 + (dist / 12.0) ** 2)  # fade in, then ~inverse square
    cone = np.clip(1.0 - across / (0.55 * dist + 1.0), 0, 1) ** 0.8
    falloff = along * cone / float((along * cone).max())
    texels = np.full((n, n, 4), 255, np.uint8)  # Panda3D's RAM layout for F_rgba is BGRA; only alpha is used
    texels[..., 3] = np.round(falloff * 255)
    tex = Texture("headlight_pool")
    tex.setup2dTexture(n, n, Texture.T_unsigned_byte, Texture.F_rgba)
    tex.setRamImage(texels.tobytes())
    tex.setWrapU(Texture.WM_clamp)
    tex.setWrapV(Texture.WM_clamp)
    maker = CardMaker("headlight_pool")
    maker.setFrame(-POOL_HALF_WIDTH_M, POOL_HALF_WIDTH_M, near, far)
    pool = parent.attachNewNode("headlight_pool_root")
    card = pool.attachNewNode(maker.generate())
    card.setP(-90)  # CardMaker builds in the XZ plane; lay it on the ground with +Z -> +Y (ahead)
    card.setTexture(tex)
    card.setShader(Shader.make(Shader.SL_GLSL, _POOL_VERTEX, _POOL_FRAGMENT), 10)
    card.setShaderInput("gain", POOL_GAIN)
    card.setTwoSided(True)
    card.setLightOff(10)
    card.setAttrib(ColorBlendAttrib.make(ColorBlendAttrib.MAdd, ColorBlendAttrib.OFbufferColor,
                                         ColorBlendAttrib.OOne))
    card.setDepthWrite(False)
    card.setBin("fixed", 10)
    return pool


def drop_hidden(boxes: list[dict]) -> list[dict]:
    """Drop boxes lying entirely inside the box of a nearer vehicle (input sorted nearest first)."""
    kept: list[dict] = []
    for b in boxes:
        hidden = any(n["x1"] <= b["x1"] and n["y1"] <= b["y1"] and b["x2"] <= n["x2"] and b["y2"] <= n["y2"]
                     for n in kept)
        if not hidden:
            kept.append(b)
    return kept


def clip_json(boxes_per_frame: list[list[dict]]) -> tuple[list[dict], int]:
    """Per-frame box JSON with track ids renumbered by first appearance; also the number of distinct vehicles."""
    track_of: dict[str, int] = {}
    frames = []
    for k, boxes in enumerate(boxes_per_frame):
        rows = []
        for b in boxes:
            track = track_of.setdefault(b["object_id"], len(track_of))
            rows.append({"track_id": track, "class": b["class"], "x1": b["x1"], "y1": b["y1"], "x2": b["x2"],
                         "y2": b["y2"]})
        frames.append({"index": k, "boxes": rows})
    return frames, len(track_of)


def _mat(m):
    import numpy as np

    return np.array([[m.getCell(r, c) for c in range(4)] for r in range(4)])


def _map_config(blocks: str):
    """`--map`: an int (that many random blocks) or a MetaDrive block-type string such as 'SCrRX'."""
    return int(blocks) if blocks.isdigit() else blocks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="staging folder for <id>.npy + <id>.raw.json")
    parser.add_argument("--jobs", required=True, help='JSON list of {"id", "seed", "night"}')
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=30, help="simulator steps (0.1 s) before recording")
    parser.add_argument("--traffic-density", type=float, default=0.3)
    parser.add_argument("--map", default="4", help="number of random road blocks, or a block string (e.g. SCrRX)")
    args = parser.parse_args(argv)
    import numpy as np

    jobs = json.loads(args.jobs)
    os.makedirs(args.out, exist_ok=True)
    renderer = Renderer(args.width, args.height, args.traffic_density, args.map)
    for job in jobs:
        t0 = time.time()
        images, boxes_per_frame, map_seed, attempts = renderer.render_clip(
            int(job["seed"]), bool(job["night"]), args.frames, args.warmup)
        frames_json, crowdedness = clip_json(boxes_per_frame)
        base = os.path.join(args.out, job["id"])
        np.save(base + ".tmp.npy", images)
        os.replace(base + ".tmp.npy", base + ".npy")
        meta = {
            "id": job["id"], "fps": FPS, "width": args.width, "height": args.height,
            "night": int(bool(job["night"])), "crowdedness": crowdedness,
            "source": (f"metadrive-simulator 0.3.0.1, seed {map_seed}, map {args.map!s} blocks, traffic density "
                       f"{args.traffic_density}, IDM policy, warm-up {args.warmup} steps"),
            "frames": frames_json,
        }
        with open(base + ".raw.json.tmp", "w") as f:
            json.dump(meta, f)
        os.replace(base + ".raw.json.tmp", base + ".raw.json")
        seconds = time.time() - t0
        print(json.dumps({"done": job["id"], "seconds": round(seconds, 2), "attempts": attempts,
                          "boxes_per_frame": round(sum(len(f["boxes"]) for f in frames_json) / len(frames_json), 2)}),
              flush=True)
    sys.stdout.flush()
    # MetaDrive's env.close() aborts (SIGABRT) in this headless setup after everything is written; the outputs
    # are complete here, so leave without running its teardown
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
