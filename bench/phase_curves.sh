# Sourced by the device scripts that run train.py with logger=none: without MLflow the GRPO phases' seconds would
# be lost, so this override makes rl/curves.csv record them beside the reward, KL and copy rate.
# shellcheck disable=SC2034  # used by the scripts that source this file
phase_curves="++callbacks.rl.training_curves.train_metrics=[train/reward_mean,train/kl,train/copy_rate,\
time/generation,time/reward,time/reference_logprobs,time/forward_backward,time/optimizer]"
