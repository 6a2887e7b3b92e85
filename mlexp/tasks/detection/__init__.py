"""Object detection: annotations in (YOLO folders, COCO JSON), images as tensors, Faster R-CNN over an mlexp backbone, COCO mAP."""
