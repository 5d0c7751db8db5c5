"""Caption every image of a folder end to end: image -> frozen encoder -> captioner -> text.

What hw3_2.sh runs. Readable images are batched through the encoder and decoded together;
unreadable ones are reported (one stderr line each) and returned, so the caller can still write
the captions of all the others and signal the skip in its exit status.
"""
import torch
from tqdm import tqdm

from captioning.decoding import caption_text, generate
from common.imageio import image_loader, image_names, report_skip
from evaluation.encoders import as_cached


@torch.inference_mode()
def caption_folder(paths, encoder, model, tokenizer, decode_config, num_workers=0, device="cpu",
                   stream=None):
    """Caption the image files `paths` (common.imageio.list_images of a folder),
    decode_config.batch_size images at a time.
    Returns ({name without extension: caption}, [ImageReadError, ...])."""
    names = image_names(paths)  # two files with one stem (a.jpg, a.png) are an error
    captions, skipped = {}, []
    loader = image_loader(paths, encoder.preprocess, decode_config.batch_size, num_workers)
    with tqdm(total=len(paths), desc="caption", unit="img") as bar:
        for batch in loader:
            for err in batch.errors:
                report_skip(err, stream)
                skipped.append(err)
            if batch.pixels is not None:
                tokens = as_cached(encoder(batch.pixels.to(device)))
                for i, hyp in zip(batch.indices, generate(model, tokens, decode_config,
                                                          tokenizer.eot_id)):
                    captions[names[i]] = caption_text(tokenizer, hyp.tokens)
            bar.update(len(batch.indices) + len(batch.errors))
    return captions, skipped
