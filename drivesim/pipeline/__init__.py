"""The pipeline layer: typed functions that run the stack's steps, what the CLI and a notebook user call.

It sits above the core (`drivesim` models, diffusion, training), `drivesim.datasets` and `drivesim.eval`, and below
`drivesim.cli`, which only parses options and prints. Nothing in the core imports it.

    train_stage(stage, preset, data, out)          one stage through the shared loop (`drivesim train`)
    encode_dataset(ae, data, out)                  the latent cache (`drivesim encode`)
    rollout_scenarios(scenarios, ckpt_dir, out, cfg)   multi-minute rollouts, sharded over processes
    generate_dataset(sources, stack, out)          labelled synthetic clips (`drivesim generate`), sharded
    sample_images(ckpt, boxes, out)                single frames from the image LDM (`drivesim sample-image`)
    run_demo(demo_settings(...))                   the whole stack end to end (`drivesim demo`)

Submodules are imported on use (`from drivesim.pipeline.train import train_stage`), so importing the package
costs nothing.
"""
