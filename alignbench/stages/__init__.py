"""The shared stages, one small module each, every one a cached function of the run's `Pipeline`:

    sft                  the SFT policy (the source's demonstrations)
    labels               preference labels (the world's annotators, or a dataset's pairs)
    reward_models        helpfulness (+ safety) reward models, calibrated, with held-out accuracy
    reference_samples    the SFT policy's evaluation samples (one per seed)
    candidates           n SFT samples per prompt from one random stream (best-of-n's, shared)
    ai_labeler           the fine-tuned world AI labeler, and the AI judge built on it
    ai_labels            the AI labeler's soft labels on the shared pairs
    pair_reward_model    one reward model on the first n shared pairs, AI- or human-labelled
    helpful_only         Constitutional AI's helpful-only policy
    sl_cai               SL-CAI: critique -> revision -> fine-tune
    cai_preference_model RL-CAI's preference model

Each module has `key(p, ...)` (every setting it reads), its build, and the stage function that
returns `(folder, summary)` through `Pipeline.stage`. `training` holds the one fine-tuning loop
and the one reward-model fit they all use; `versions` the build version of each stage.
A stage module imports no method and not the pipeline: methods and the pipeline import stages.
"""
