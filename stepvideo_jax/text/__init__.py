"""Text side: the two tokenizers (sentencepiece for Step-LLM, WordPiece for Hunyuan-CLIP) and the DiT text conditioning."""
