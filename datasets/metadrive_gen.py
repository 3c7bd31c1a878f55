"""Render first-person driving clips with exact 2D boxes in MetaDrive 0.3.0.1 (headless, CPU).

This file runs as a plain script inside the simulator's own virtual environment (`scripts/setup_sim.sh`), which has
metadrive, panda3d and numpy but none of drivesim's dependencies, so it imports only those and the standard
library. `drivesim.datasets.simulate` starts it as a subprocess and converts its raw output into the clip format.

Usage (one worker)::

    .venv-sim/bin/python datasets/metadrive_gen.py --out STAGING --jobs '[{"id": "clip_0000", "seed": 3, "night": 1}]'
        --frames 32 --width 256 --height 128 --warmup 20

For every job it writes `STAGING/<id>.npy` (uint8 RGB frames (t, h, w, 3)) and `STAGING/<id>.raw.json` (fps, size,
night, crowdedness, per-frame boxes in pixels), the JSON last (it marks the clip complete).

Facts this relies on (see `shared/notes/metadrive.md`): one env step is 0.1 s (10 fps); rendering needs
`multi_thread_render=False` and no multisampling; the PBR pipeline must be built with `msaa_samples=0`. Boxes: the
8 corners of each vehicle's tight bounds (in its own frame) are moved into the camera frame, projected with the
camera lens, and the min/max taken; boxes with a corner behind the camera, beyond `MAX_DISTANCE_M`, or under
`MIN_BOX_PX` after clipping to the image are dropped. Boxes are not occlusion-filtered.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("LP_NUM_THREADS", "1")  # llvmpipe threads: one per worker process renders fastest here

MAX_DISTANCE_M = 120.0
MIN_BOX_PX = 2.0
FPS = 10.0
# Traffic model mix for (s, m, l, xl, default, static_default): "l" (94k triangles) and "default" (256k) are
# what makes software rendering slow, so traffic uses the light models only.
TRAFFIC_TYPE_P = [0.4, 0.35, 0.0, 0.25, 0.0, 0.0]
# MetaDrive vehicle classes -> drivesim classes (bbox_conditioning/classes.py): s (beetle), m, l (lada) and
# default are passenger cars; xl is a box truck.
CLASS_OF_TYPE = {"SVehicle": "car", "MVehicle": "car", "LVehicle": "car", "DefaultVehicle": "car",
                 "XLVehicle": "truck"}
NIGHT_DIRECTIONAL = (0.12, 0.12, 0.2)
NIGHT_AMBIENT = (0.04, 0.04, 0.07)
NIGHT_SKY = (0.02, 0.02, 0.05)


def _patch_renderer():
    from panda3d.core import loadPrcFileData

    loadPrcFileData("", "framebuffer-multisample 0\nmultisamples 0\n")
    import metadrive.engine.core.our_pbr as our_pbr

    original = our_pbr.OurPipeline.__init__

    def init_without_msaa(self, *args, **kwargs):
        kwargs["msaa_samples"] = 0  # the software rasteriser cannot create multisampled buffers
        original(self, *args, **kwargs)

    our_pbr.OurPipeline.__init__ = init_without_msaa

    from metadrive.component.vehicle.vehicle_type import random_vehicle_type
    from metadrive.manager.traffic_manager import PGTrafficManager

    PGTrafficManager.random_vehicle_type = lambda self: random_vehicle_type(self.np_random, TRAFFIC_TYPE_P)


class Renderer:
    """One MetaDrive environment that renders clips for a list of seeds."""

    def __init__(self, width: int, height: int, traffic_density: float, num_maps: int, start_seed: int,
                 map_blocks: str):
        _patch_renderer()
        from metadrive.envs.metadrive_env import MetaDriveEnv
        from metadrive.policy.idm_policy import IDMPolicy

        self.width, self.height = width, height
        self.env = MetaDriveEnv(dict(
            use_render=False, image_observation=True, rgb_clip=False,
            vehicle_config=dict(image_source="rgb_camera", rgb_camera=(width, height), stack_size=1),
            global_light=False, show_skybox=False, show_logo=False, show_fps=False, show_interface=False,
            multi_thread_render=False, agent_policy=IDMPolicy, traffic_density=traffic_density,
            start_seed=start_seed, environment_num=num_maps, map=map_blocks,
        ))
        self.start_seed, self.num_maps = start_seed, num_maps
        self._headlights = None

    # -- scene setup -------------------------------------------------------------------------------------------

    def _speed_up(self):
        from metadrive.constants import CamMask

        engine, ego = self.env.engine, self.env.vehicle
        # the roof camera cannot see the ego model, but rendering it costs its 256k triangles every frame
        ego.origin.hide(CamMask.RgbCam)
        # (deactivating the main window's display regions or the shadow caster, as the notes suggest, stalled
        # rendering here: every step took minutes; left as MetaDrive sets them)
        del engine

    def _set_lighting(self, night: bool):
        from panda3d.core import LVector4, Spotlight, Vec4

        engine, ego = self.env.engine, self.env.vehicle
        light = engine.world_light
        sensor = ego.image_sensors["rgb_camera"]
        if night:
            light.direction_np.node().setColor(LVector4(*NIGHT_DIRECTIONAL, 1))
            light.ambient_np.node().setColor(LVector4(*NIGHT_AMBIENT, 1))
            sky = Vec4(*NIGHT_SKY, 1)
        else:  # MetaDrive's own defaults
            light.direction_np.node().setColor(LVector4(1, 1, 1, 1))
            light.direction_np.node().setColorTemperature(6800)
            light.ambient_np.node().setColor(LVector4(0.18, 0.2, 0.2, 1))
            sky = Vec4(*sensor.BKG_COLOR) if len(sensor.BKG_COLOR) == 4 else Vec4(*sensor.BKG_COLOR, 1)
        buffers = [sensor.buffer] + list(getattr(getattr(sensor, "manager", None), "buffers", []) or [])
        for buffer in buffers:
            buffer.setClearColor(sky)
            for i in range(buffer.getNumDisplayRegions()):
                buffer.getDisplayRegion(i).setClearColor(sky)
        if self._headlights is not None:
            engine.render.clearLight(self._headlights)
            self._headlights.removeNode()
            self._headlights = None
        if night:
            spot = Spotlight("headlights")
            spot.setColor(LVector4(4.0, 4.0, 3.5, 1))
            spot.getLens().setFov(70)
            spot.setAttenuation((1.0, 0.0, 0.002))
            self._headlights = ego.origin.attachNewNode(spot)
            self._headlights.setPos(0, 1.5, 1.0)
            self._headlights.setHpr(0, -6, 0)
            engine.render.setLight(self._headlights)

    # -- boxes -------------------------------------------------------------------------------------------------

    def boxes(self) -> list[dict]:
        """2D boxes (pixels, image frame, xyxy) of every other vehicle in view."""
        from panda3d.core import Point2, Point3

        engine, ego = self.env.engine, self.env.vehicle
        sensor = ego.image_sensors["rgb_camera"]
        cam, lens = sensor.cam, sensor.lens
        out = []
        for vehicle in engine.traffic_manager.spawned_objects.values():
            if vehicle is ego or not hasattr(vehicle, "origin"):
                continue
            lo, hi = vehicle.origin.getTightBounds(vehicle.origin)
            xs, ys, depths = [], [], []
            behind = False
            for x in (lo.x, hi.x):
                for y in (lo.y, hi.y):
                    for z in (lo.z, hi.z):
                        p = cam.getRelativePoint(vehicle.origin, Point3(x, y, z))  # camera frame: y forward
                        if p.y <= 0.05:
                            behind = True
                            break
                        film = Point2()
                        lens.project(p, film)  # film coords in [-1, 1] inside the view, filled outside too
                        xs.append((film.x + 1.0) * 0.5 * self.width)
                        ys.append((1.0 - film.y) * 0.5 * self.height)
                        depths.append(p.y)
                    if behind:
                        break
                if behind:
                    break
            if behind or min(depths) > MAX_DISTANCE_M:
                continue
            x1, y1 = max(min(xs), 0.0), max(min(ys), 0.0)
            x2, y2 = min(max(xs), float(self.width)), min(max(ys), float(self.height))
            if x2 - x1 < MIN_BOX_PX or y2 - y1 < MIN_BOX_PX:
                continue
            out.append({"object_id": vehicle.id, "class": CLASS_OF_TYPE.get(type(vehicle).__name__, "car"),
                        "x1": round(x1, 2), "y1": round(y1, 2), "x2": round(x2, 2), "y2": round(y2, 2)})
        return out

    # -- clips -------------------------------------------------------------------------------------------------

    def render_clip(self, seed: int, night: bool, frames: int, warmup: int):
        import numpy as np

        env = self.env
        map_seed = self.start_seed + seed % self.num_maps
        env.reset(force_seed=map_seed)
        self._speed_up()
        self._set_lighting(night)
        images, boxes_per_frame = [], []
        for step in range(warmup + frames):
            obs, _, done, _ = env.step([0.0, 0.0])
            if step < warmup:
                continue
            images.append(obs["image"][..., -1][..., ::-1].copy())  # BGR -> RGB
            boxes_per_frame.append(self.boxes())
        track_of: dict[str, int] = {}
        frames_json = []
        for k, boxes in enumerate(boxes_per_frame):
            for b in boxes:
                b["track_id"] = track_of.setdefault(b.pop("object_id"), len(track_of))
            frames_json.append({"index": k, "boxes": boxes})
        return np.stack(images).astype(np.uint8), frames_json, len(track_of), map_seed

    def close(self):
        self.env.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--jobs", required=True, help="JSON list of {id, seed, night}")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--traffic-density", type=float, default=0.3)
    parser.add_argument("--num-maps", type=int, default=50)
    parser.add_argument("--start-seed", type=int, default=0)
    parser.add_argument("--map", default="SCSC",
                        help="MetaDrive block sequence (S straight, C curve, ...); intersections and roundabouts "
                             "render several times slower in software")
    args = parser.parse_args(argv)
    import numpy as np

    jobs = json.loads(args.jobs)
    os.makedirs(args.out, exist_ok=True)
    renderer = Renderer(args.width, args.height, args.traffic_density, args.num_maps, args.start_seed, args.map)
    for job in jobs:
        t0 = time.time()
        images, frames_json, num_tracks, map_seed = renderer.render_clip(
            int(job["seed"]), bool(job["night"]), args.frames, args.warmup)
        base = os.path.join(args.out, job["id"])
        np.save(base + ".npy.tmp.npy", images)
        os.replace(base + ".npy.tmp.npy", base + ".npy")
        meta = {
            "id": job["id"], "fps": FPS, "width": args.width, "height": args.height,
            "night": int(bool(job["night"])), "crowdedness": num_tracks,
            "source": (f"metadrive-simulator 0.3.0.1, map seed {map_seed}, traffic density "
                       f"{args.traffic_density}, IDM policy, warm-up {args.warmup} steps"),
            "frames": frames_json,
        }
        with open(base + ".raw.json.tmp", "w") as f:
            json.dump(meta, f)
        os.replace(base + ".raw.json.tmp", base + ".raw.json")
        print(json.dumps({"done": job["id"], "seconds": round(time.time() - t0, 2),
                          "frames": args.frames + args.warmup}), flush=True)
    # Panda3D aborts (SIGABRT) while tearing the engine down at interpreter exit; every output above is already
    # written and renamed, so leave without the teardown.
    sys.stdout.flush()
    os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
