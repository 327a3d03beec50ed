-- Orthanc: send every new CR or DX instance to the pneumoscan DICOM node (modality "pneumoscan"
-- in DicomModalities). Its answers (SR and OT objects) come back into the same study and are
-- not CR/DX, so they are never routed again.
function OnStoredInstance(instanceId, tags, metadata, origin)
  local modality = tags["Modality"]
  if modality == "CR" or modality == "DX" then
    SendToModality(instanceId, "pneumoscan")
  end
end
