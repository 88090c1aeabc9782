"""The double's node catalogue: INPUT_TYPES-like specs (used for validation and /object_info) and cheap Pillow
implementations.

    base      what a node is made of (NodeDef, NodeCall, NodeOutput, ExecEnv, ModelRef) and input-spec helpers
    image     image nodes, the file loaders (LoadImage, LoadImageOutput, LoadLatent, LoadVideo), SaveImageWebsocket
    sampling  checkpoint and LoRA loaders, CLIPTextEncode, latents, KSampler, VAEDecode
    media     animation, video, audio, text and latent output nodes, VHS_VideoCombine
    registry  the node table of a server (build_registry) and a node's /object_info entry (node_info)
"""
