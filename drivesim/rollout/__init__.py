"""Multi-minute rollouts: hierarchical generation (key frames -> x4 -> x4), streamed to disk, resumable.

Pipeline (Video LDM sec. 3 / LVDM sec. 3.3; SPEC "Rollout"):

1. key frame 0 from the box- and label-conditioned image LDM;
2. key-frame clips of `keyframe_clip_length` frames by the prediction model, the first from 1 context frame
   (key frame 0), every later one from the last 2 key frames, with LVDM's conditional latent perturbation (the
   context diffused to `context_noise_level`) and context guidance s (= LVDM's unconditional guidance
   (1 + w) eps_c - w eps_u with w = s - 1) plus label/box classifier-free guidance;
3. the interpolation model fills 3 frames between consecutive frames, once per x4 stage: key frames are
   `R = prediction.frame_stride / interpolation.frame_stride` output frames apart, so there are log4(R) stages
   (R = 16: stages 0 then 1, Video LDM's 1.875 -> 7.5 -> 30 fps; R = 4: only the fine stage 1, which is what the
   10 fps sample data trains: key frames at 2.5 fps -> 10 fps);
4. the video decoder decodes the output-rate latents in overlapping chunks (the decode windows of
   `AutoencoderKL.decode` over the whole video, cross-faded the same way, so a streamed decode equals the
   one-shot chunked decode);
5. optionally the x4 pixel upsampler, in chunks of `upsample_chunk_frames` decoded frames.

On LVDM's 3D-autoencoder latents (He et al. 2022 Sec. 3; the stack's autoencoder a `video_autoencoder_3d`, one
latent frame per 4 video frames) the stack is that autoencoder and the prediction model only: unit 0 is a clip the
prediction model generates unconditionally (no image LDM), every later clip continues from the last
`context_frames[1]` latent frames, there is no interpolation (key frames are the consecutive output-rate latent
frames), and step 4 decodes latent windows to 4 video frames per latent frame with the same cross-fade as the 3D
autoencoder's `decode_scaled`. The conditioning is then asked per latent frame: the boxes of its 4 video frames
reduced as the training cache reduced them (`drivesim.pipeline.rollout.pack_conditioning`); the labels written stay
per video frame.

The boxes of every output frame come from the conditioning source (the scenario resampled to the output frame
rate), so they are the labels of the generated video. This module takes the conditioning as a callable and
never reads scenario files itself (`drivesim.pipeline.rollout` does, with `drivesim.datasets.scenario`).

Streaming and memory: work proceeds in units (unit 0: the image-LDM frame; unit u >= 1: one prediction clip and
everything it makes final: its interpolation windows, the decode windows whose latents are complete, the
upsampler chunks). After each unit the new key latents and output-rate latents are written to
`latents/keys_<u>.npy` / `latents/frames_<u>.npy`, the newly final frames to `segments/seg_<u>.mp4` (a closed,
playable mp4 per unit, written by the caller's `segment_writer`), and then the state (a new
`state-<n>.safetensors`, then `state.json` naming it, each temp file + rename: one atomic commit). The working
set is the context window, the key frames not yet interpolated, the latents of the current decode window and the
cross-fade partial sums: it does not grow with the rollout length. The final mp4 is assembled from the segments
at the end (`drivesim.pipeline.rollout`).

Resume: every unit draws its noise from its own generator seeded with (seed, unit index) (`unit_generator`),
and the state holds everything later units read, so a rollout killed at any point and resumed produces the same
latents and frames as an uninterrupted run (same seed, same config, same checkpoints: the state records a hash
of all three and refuses a mismatch).

Checkpoint folder layout (`load_models`): D/autoencoder (video autoencoder; an image autoencoder also works),
D/image_ldm, D/prediction, D/interpolation, optional D/upsampler; each an exported model folder (or a training
run folder) loadable by `drivesim.load`.
"""

from drivesim.rollout.config import (
    FACTOR,
    MAX_FRAMES,
    MAX_MINUTES,
    MODEL_DIRS,
    STATE_VERSION,
    RolloutConfig,
    check_rollout_config,
    check_rollout_length,
)
from drivesim.rollout.plan import RolloutPlan, make_plan, process_device, shard, to_uint8, unit_generator
from drivesim.rollout.runner import Rollout
from drivesim.rollout.stack import (
    RolloutModels,
    checkpoint_sha256s,
    init_checkpoint_dir,
    load_models,
    resolve_fps,
    stack_fps,
)

__all__ = ["RolloutConfig", "RolloutModels", "RolloutPlan", "Rollout", "load_models", "init_checkpoint_dir",
           "unit_generator", "shard", "check_rollout_config", "check_rollout_length", "MODEL_DIRS", "STATE_VERSION",
           "MAX_MINUTES", "MAX_FRAMES", "FACTOR", "make_plan", "process_device", "resolve_fps",
           "stack_fps", "to_uint8", "checkpoint_sha256s"]

