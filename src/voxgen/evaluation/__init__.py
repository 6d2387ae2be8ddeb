"""Evaluation: metrics on volumes and the `evaluate` / `find-steps` commands.

pixel         paired PSNR, SSIM, MS-SSIM with 3D windows
distribution  FID, KID, MMD between feature sets
features      feature extractors by name (random3d, resnet50 on 2.5D slices, ct-resnet152)
masks         thresholding, Dice, HD95, lesion counts and sizes
distances     intensity and lesion-fraction Wasserstein distances (no extractor)
metrics       the metric registry
evaluate      sampling per solver configuration and scoring; golden-section step search
report        Markdown / CSV tables and the metric-against-NFE chart
commands      the command-line parsers
"""
