"""Memory planning for Qwen3-VL: predict per-GPU memory for serving and training before anything loads."""

from qvl.plan.gpus import GPUS, Gpu, parse_mem, resolve_gpu
from qvl.plan.memory import Plan, Recommendation, plan_serve, plan_train
from qvl.plan.model import ModelShape, resolve_model
from qvl.plan.preflight import Preflight, preflight_serve, preflight_train

__all__ = ["GPUS", "Gpu", "ModelShape", "Plan", "Preflight", "Recommendation", "parse_mem", "plan_serve",
           "plan_train", "preflight_serve", "preflight_train", "resolve_gpu", "resolve_model"]
