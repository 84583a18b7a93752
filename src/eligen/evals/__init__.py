"""Quality benchmarks of entity control on one harness (docs/design.md section 13).

``eligen bench layoutsam`` (LayoutSAM-Eval), ``eligen bench cocomig`` (COCO-MIG) and ``eligen bench shapes``
(ShapesBench) share the stages here: layouts read from the benchmark's public files (:mod:`.layouts`), a sharded,
resumable generation stage (:mod:`.generation`), scoring (:mod:`.layoutsam`, :mod:`.cocomig`, with the pure box and
colour maths in :mod:`.boxes` and :mod:`.colour`), and the reports: tables beside the published numbers, contact
sheets and a JSON of every per-entity score (:mod:`.report`). :mod:`.harness` runs the stages in order.
"""
