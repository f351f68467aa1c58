"""Every in-place change to another library's objects, one per module, each naming what it changes and why.

``fused_head`` (TRL's fused LM head on models without a backbone module), ``vision_attention`` (Qwen-VL towers'
segment attention as one batched call), and ``compile_layers`` (torch.compile per decoder layer and vision block).
"""
