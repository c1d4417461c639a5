"""Gymnasium ids for the locomotion variants the env presets name.

``aaren_rl.locomotion:AntNoContact-v5`` is Ant-v5 observing only the 27 numbers of joint positions
and velocities (``include_cfrc_ext_in_observation=False``): Ant-v4's default, what the RL Zoo's
learner settings were tuned on, and in effect D4RL's Ant (its 84 contact-force numbers were all
zeros, a MuJoCo 2.0 bug). Dynamics, reward, termination and episode length are Ant-v5's. The
module in the id makes ``gym.make`` import this file, which registers the env, so datasets,
training and evaluation all name the same env with no setup.
"""

import gymnasium as gym

ANT_NO_CONTACT = "AntNoContact-v5"

if ANT_NO_CONTACT not in gym.registry:
    # a string entry point: Minari stores the spec as JSON
    gym.register(ANT_NO_CONTACT, entry_point="gymnasium.envs.mujoco.ant_v5:AntEnv", max_episode_steps=1000,
                 kwargs={"include_cfrc_ext_in_observation": False})
