"""The benchmarks' judge prompts, verbatim, as data (docs/design.md section 13). Comparable numbers need the very
words the protocols ask with, so these are the protocols' own strings, with ``$name`` where they insert a value;
nothing here may be reworded. ``tests/test_evals_protocols.py`` pins each rendered prompt.

- LayoutSAM-Eval: CreatiLayout's ``score_layoutsam_benchmark.py`` (the same strings in ContextGen's
  ``bench/sample_scripts/layoutsam/layoutsam_eval.py``). ``$description`` is the region caption and ``$detail`` the
  detailed caption, each with every ``/`` removed; ``$attribute`` is ``color``, ``texture`` or ``shape``.
- OverLayBench: ``overlaybenchpytools/utils.py`` of its evaluation toolkit (``bbox_prompt``, ``entity_prompt``,
  ``relationship_prompt``). ``$categories``, ``$instances``, ``$boxes`` and ``$relations`` are Python ``repr`` texts
  of the annotation's parts, as the toolkit's f-strings make them. Its sentences are joined without spaces, as there.
"""

from __future__ import annotations

from string import Template

LAYOUTSAM_PRESENCE = Template(
    'Is the subject "${description}" present in the image? Strictly answer with "Yes" or "No", without any irrelevant '
    'words.')
LAYOUTSAM_ATTRIBUTE = Template(
    'Is the subject in "${description}" in the image consistent with the ${attribute} described in the detailed '
    'description: "${detail}"? Strictly answer with "Yes" or "No", without any irrelevant words. If the '
    '${attribute} is not mentioned in the detailed description, the answer is "Yes".')

OVERLAYBENCH_SYSTEM = "You are Qwen-VL, created by Alibaba Cloud. You are a helpful assistant."
OVERLAYBENCH_BOXES = Template(
    "You are required to detect all the instances of the following categories ${categories} in the image."
    "Response in json format:"
    "{"
    "'category_1': [[x1, y1, x2, y2], [x1, y1, x2, y2], ...],"
    "'category_2': [[x1, y1, x2, y2], ...]"
    "..."
    "}"
    "For each category, provide a list of bounding boxes of all its instances in the image."
    "Each bounding box must correspond to a single, distinct individual object — never a group or collection."
    "Strictly follow this instruction without exceptions or interpretation."
    "Strictly follow the format in English, without any irrelevant words.")
OVERLAYBENCH_ENTITIES = Template(
    "You are required to answer whether the instances in an image matches the corresponding descriptions, based on "
    "its bounding box."
    "Here are the instance name, the corresponding bbox and the instance description:"
    "${instances}"
    "Please follow these rules:"
    "Check if the generated instance visually matches its local_prompt description."
    "If the instance is clearly generated and not corrupted, and its key attributes described in the local_prompt "
    "are present, answer 'Yes'."
    "If the instance is missing, corrupted, or the key attributes are not present, answer 'No'."
    "Response in the following format:"
    "```json"
    "{"
    '  Instance_name: "Yes"/"No",'
    "  ..."
    "}"
    "```"
    "Each key must be from the dict of the instance name, the corresponding bbox and the instance description."
    "Each value must be 'Yes' or 'No'."
    "If the instance name is not in the image, the answer should be 'No'."
    "Strictly follow the format in English, without any irrelevant words.")
OVERLAYBENCH_RELATIONS = Template(
    "You are required to answer whether the relationship between two instances in an image matches the description."
    "Here are the instance name and the bbox:"
    "${boxes}"
    "Here is dict of the instance pair and the ground truth relationship descriptions:"
    "${relations}"
    "Please follow these rules:"
    "For proximity relations like near, beside, close to, next to, if the two instances are generated well (not "
    "corrupted or fused into one) and their bounding boxes are close, you can consider the description as matched."
    "For directional or positional relations like behind, in front of, you must strictly check if the spatial "
    "arrangement in the image actually matches the description, because bounding boxes alone are not enough."
    "Response in the following format:"
    "```json"
    "{"
    '  "(Instance_1, Instance_2)": "Yes"/"No",'
    "  ..."
    "}"
    "```"
    "Each key must be a tuple from the dict of the instance pair and the ground truth relationship descriptions."
    "Each value must be 'Yes' or 'No'."
    "'Yes' means the action/spatial relationship between the two instances matches the description."
    "You shouldn't pay too much attention on how well the bounding boxes are aligned."
    "Strictly follow the format in English, without any irrelevant words.")
