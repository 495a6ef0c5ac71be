"""The model: its config, its blocks and likelihoods, the VAE, and its checkpoint files.

:class:`ModelConfig` (one validated dataclass) builds a :class:`VAE`, whose one masked
top-down path serves training, evaluation, KL analysis, pruning, encoding, decoding and
sampling. ``inputs`` turns uint8 images into model input; ``evaluation`` scores a split
(negative ELBO, importance-weighted NLL); ``generate`` samples, reconstructs and draws
openai/vdvae's first-K figure; ``checkpoints`` writes and safely reads checkpoint files and
run directories (``torch.load(weights_only=True)`` only); ``openai_hps`` builds
openai/vdvae's models as configs.
"""

from ..core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "config": ["ModelConfig", "parse_setting"],
    "vae": ["VAE", "VAEOutput", "count_parameters", "meta_model"],
    "inputs": ["check_images_fit", "prepare_batch", "evaluation_images", "fixed_binarization", "eval_binarization"],
    "evaluation": ["EvalResult", "evaluate", "eval_checkpoint", "iter_batches"],
    "scores": ["score_images", "score_batch", "score_columns", "parse_ks"],
    "generate": ["sample_images", "reconstruct_images", "first_k_images", "first_k_decodes"],
    "checkpoints": ["save_checkpoint", "load_checkpoint", "read_torch_file", "load_model",
                    "resolve_checkpoint", "list_checkpoints", "latest_checkpoint", "checkpoint_path",
                    "prune_checkpoints", "file_sha256", "describe_run", "last_metrics"],
    "openai_hps": ["OpenAIHps", "OPENAI_HPS", "get_openai_hps", "parse_blocks", "openai_layout", "openai_config"],
})
