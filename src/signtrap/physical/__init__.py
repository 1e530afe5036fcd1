"""Physical stickers on the sign: an expectation-over-transformation (EOT) renderer in the sign's coordinates
(`render`), the sticker patterns and the optimised pattern (`patterns`), the fixed-grid physical evaluation
(`evaluate`) and photographs (`photos`). Pure numpy/OpenCV functions: no config, no run directory."""
