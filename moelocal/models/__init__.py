"""Model families by config.json `model_type`."""

from . import (
    deepseek,
    ernie4_5_moe,
    glm4_moe,
    gpt_oss,
    granitemoe,
    minimax_m2,
    mixtral,
    olmoe,
    phimoe,
    qwen2_moe,
    qwen3_5_moe,
    qwen3_moe,
    qwen3_next,
)
from .family import Family

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        mixtral.FAMILY,
        qwen2_moe.FAMILY,
        qwen3_moe.FAMILY,
        olmoe.FAMILY,
        deepseek.V2,
        deepseek.V3,
        gpt_oss.FAMILY,
        glm4_moe.FAMILY,
        qwen3_next.FAMILY,
        qwen3_5_moe.FAMILY,
        qwen3_5_moe.TEXT,
        granitemoe.FAMILY,
        phimoe.FAMILY,
        ernie4_5_moe.FAMILY,
        minimax_m2.FAMILY,
    )
}
